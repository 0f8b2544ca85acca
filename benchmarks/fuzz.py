"""Structured fuzzing of the DICOM edge, against a node this script starts (`dicom-node serve`).

    .venv/bin/python benchmarks/fuzz.py --datasets 8000 --pdus 2000 --seed 1 --json out.json

Data sets: pydicom's sample files (every transfer syntax family the node accepts) are given a
fresh SOP Instance UID per case, then mutated (bit flips, truncation, inserted or deleted
bytes, hostile length fields, unknown VRs, deflate bombs, deeply nested sequences, pixel data
that contradicts the transfer syntax, images cut before Pixel Data) and sent as C-STORE over
valid associations. PDUs: A-ASSOCIATE-RQ and P-DATA-TF PDUs mutated the same way and written
to raw sockets. Recorded: crashes (the node process exits), hangs (no answer within
--timeout), the statuses answered, acknowledged instances that are missing or altered on
disk, and the node's memory (VmRSS now, VmHWM peak) before and after. The suite runs a few
hundred cases of the same generator (tests/test_fuzz.py); docs/robustness.md has the results.

Hand-written because no maintained fuzzer knows DICOM's element framing and the DIMSE/ACSE
exchanges; the mutations are driven by a seeded random.Random, so a failing case is replayed
by its seed and index.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import socket
import struct
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, UID  # noqa: E402

from dicom_node.framing import LONG_VRS  # noqa: E402
from dicom_node.part10 import split_part10  # noqa: E402

SEEDS = {  # pydicom's sample files: one per transfer syntax family
    "ct_explicit": "CT_small.dcm", "mr_implicit": "MR_small_implicit.dcm", "mr_big_endian": "MR_small_bigendian.dcm",
    "deflate": "image_dfl.dcm", "jpeg": "SC_rgb_jpeg_dcmtk.dcm", "jpeg2000": "MR_small_jp2klossless.dcm",
    "rle": "MR_small_RLE.dcm", "rle_2frame": "SC_rgb_rle_2frame.dcm", "sr": "test-SR.dcm",
    "us_palette": "examples_palette.dcm",
}
INTERESTING_U32 = [0, 1, 0x7F, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]


@dataclass(frozen=True)
class Seed:
    name: str
    sop_class: str
    sop_instance: str
    transfer_syntax: UID
    dataset: bytes          # encoded data set as in the file (deflated for the deflate seed)


@dataclass
class Case:
    kind: str
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    dataset: bytes


def load_seeds() -> list[Seed]:
    folder = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent
    seeds = []
    for name, filename in SEEDS.items():
        raw = (folder / filename).read_bytes()
        ts, dataset = split_part10(raw)
        header = pydicom.dcmread(folder / filename, stop_before_pixels=True)
        seeds.append(Seed(name, str(header.SOPClassUID), str(header.SOPInstanceUID), UID(ts), dataset))
    return seeds


def same_length_uid(rng: random.Random, length: int) -> str:
    digits = "".join(rng.choice("0123456789") for _ in range(max(length - 5, 1)))
    return ("2.25." + digits.lstrip("0").rjust(len(digits), "1"))[:length]


def fresh_instance(seed: Seed, rng: random.Random) -> tuple[str, bytes]:
    """The seed with a new SOP Instance UID of the same length (framing unchanged), so each
    acknowledged case is a distinct stored object. Deflated seeds are re-deflated."""
    dataset = seed.dataset
    deflated = seed.transfer_syntax == DeflatedExplicitVRLittleEndian
    if deflated:
        dataset = zlib.decompressobj(-zlib.MAX_WBITS).decompress(dataset)
    old = seed.sop_instance.encode()
    new = same_length_uid(rng, len(old)).encode()
    dataset = dataset.replace(old, new)
    if deflated:
        dataset = deflate(dataset)
    return new.decode(), dataset


def deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def explicit_offsets(data: bytes) -> list[int]:
    """Offsets of top-level element headers of an Explicit VR Little Endian data set (best effort)."""
    offsets, pos = [], 0
    while pos + 8 <= len(data):
        offsets.append(pos)
        vr = data[pos + 4:pos + 6]
        if vr in LONG_VRS:
            length = struct.unpack_from("<I", data, pos + 8)[0] if pos + 12 <= len(data) else 0
            pos += 12 + (0 if length == 0xFFFFFFFF else length)
            if length == 0xFFFFFFFF:
                break       # a sequence or encapsulated pixel data: stop at the first one
        else:
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]
    return offsets


# ----- data set mutations ----------------------------------------------------------------------

def flip_bits(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        pos = rng.randrange(len(out))
        out[pos] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.randrange(len(data))]


def splice(data: bytes, rng: random.Random) -> bytes:
    pos = rng.randrange(len(data))
    if rng.random() < 0.5:
        return data[:pos] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + data[pos:]
    return data[:pos] + data[pos + rng.randint(1, 16):]


def hostile_length(data: bytes, rng: random.Random) -> bytes:
    offsets = explicit_offsets(data) or [0]
    pos = rng.choice(offsets)
    out = bytearray(data)
    vr = data[pos + 4:pos + 6]
    if vr in (b"OB", b"OW", b"SQ", b"UT", b"UN") and pos + 12 <= len(out):
        struct.pack_into("<I", out, pos + 8, rng.choice(INTERESTING_U32))
    elif pos + 8 <= len(out):
        struct.pack_into("<H", out, pos + 6, rng.choice([0, 1, 0xFFFF, 0x7FFF, 0x8000]))
    return bytes(out)


def unknown_vr(data: bytes, rng: random.Random) -> bytes:
    offsets = explicit_offsets(data) or [0]
    pos = rng.choice(offsets)
    out = bytearray(data)
    out[pos + 4:pos + 6] = rng.choice([b"ZZ", b"\x00\x00", b"ob", b"??", bytes([rng.randrange(256), rng.randrange(256)])])
    return bytes(out)


def nested_sequences(depth: int) -> bytes:
    """A private sequence nested `depth` levels deep (undefined lengths), explicit VR LE."""
    start = struct.pack("<HH2s2sI", 0x0009, 0x1010, b"SQ", b"\0\0", 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    creator = struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", 4) + b"FUZZ"
    return creator + start * depth + end * depth


def insert_top_level(data: bytes, element: bytes, group: int) -> bytes:
    """Insert encoded elements before the first top-level element of a later group (best effort)."""
    for pos in explicit_offsets(data):
        if struct.unpack_from("<H", data, pos)[0] > group:
            return data[:pos] + element + data[pos:]
    return data + element


def pixel_data_offset(data: bytes) -> int | None:
    for pos in explicit_offsets(data):
        if data[pos:pos + 4] == b"\xe0\x7f\x10\x00":
            return pos
    return None


def dataset_cases(seeds: list[Seed], rng: random.Random):
    """Endless seeded cases: (kind, sop_class, sop_instance, transfer syntax, data set bytes)."""
    plain = [s for s in seeds if s.transfer_syntax == ExplicitVRLittleEndian]
    while True:
        seed = rng.choice(seeds)
        instance, data = fresh_instance(seed, rng)
        ts = str(seed.transfer_syntax)
        roll = rng.random()
        if roll < 0.30:
            kind, data = "bit_flip", flip_bits(data, rng)
        elif roll < 0.45:
            kind, data = "truncate", truncate(data, rng)
        elif roll < 0.55:
            kind, data = "splice", splice(data, rng)
        elif roll < 0.70 and seed.transfer_syntax == ExplicitVRLittleEndian:
            kind, data = "hostile_length", hostile_length(data, rng)
        elif roll < 0.78 and seed.transfer_syntax == ExplicitVRLittleEndian:
            kind, data = "unknown_vr", unknown_vr(data, rng)
        elif roll < 0.82:
            seed = rng.choice(plain)
            instance, data = fresh_instance(seed, rng)
            kind, ts = "deep_nesting", str(seed.transfer_syntax)
            data = insert_top_level(data, nested_sequences(rng.choice([40, 100, 200, 1000])), 0x0009)
        elif roll < 0.86:
            seed = rng.choice(plain)
            instance, data = fresh_instance(seed, rng)
            kind, ts = "deflate_bomb", str(DeflatedExplicitVRLittleEndian)
            padding = struct.pack("<HH2sH", 0x7FE1, 0x1010, b"LO", 0) * rng.choice([10_000, 2_000_000])
            data = deflate(data + padding)
        elif roll < 0.92:
            seed = rng.choice(plain)
            instance, data = fresh_instance(seed, rng)
            kind = "native_pixels_declared_compressed"
            ts = rng.choice(["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"])
        elif roll < 0.96:
            seed = rng.choice(plain)
            instance, data = fresh_instance(seed, rng)
            cut = pixel_data_offset(data)
            kind, data = "cut_before_pixel_data", data[:cut] if cut else data[:-1]
        else:
            kind, data = "transfer_syntax_swap", data
            ts = rng.choice(["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                             str(DeflatedExplicitVRLittleEndian)])
        yield Case(kind, seed.sop_class, instance, ts, data)


# ----- PDUs ----------------------------------------------------------------------------------

def captured_associate_rq(calling_ae: str = "PYNETDICOM", called_ae: str = "LINKNODE") -> bytes:
    """A real A-ASSOCIATE-RQ for Verification, as pynetdicom sends it (captured on a local socket)."""
    import threading

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    captured = {}

    def accept() -> None:
        conn, _ = listener.accept()
        conn.settimeout(5)
        header = conn.recv(6, socket.MSG_WAITALL)
        captured["rq"] = header + conn.recv(struct.unpack(">I", header[2:6])[0], socket.MSG_WAITALL)
        conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 2
    ae.associate("127.0.0.1", listener.getsockname()[1], ae_title=called_ae)
    thread.join(5)
    listener.close()
    return captured["rq"]


def echo_p_data(context_id: int = 1, message_id: int = 1) -> bytes:
    """A P-DATA-TF PDU carrying a C-ECHO-RQ command set (Implicit VR Little Endian)."""
    uid = b"1.2.840.10008.1.1\0"
    body = (struct.pack("<HHI", 0, 2, len(uid)) + uid + struct.pack("<HHIH", 0, 0x100, 2, 0x0030)
            + struct.pack("<HHIH", 0, 0x110, 2, message_id) + struct.pack("<HHIH", 0, 0x800, 2, 0x0101))
    command = struct.pack("<HHII", 0, 0, 4, len(body)) + body
    pdv = struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def pdu_cases(rq: bytes, rng: random.Random):
    """Endless seeded PDU cases: (kind, bytes before the mutated part, mutated bytes)."""
    while True:
        roll = rng.random()
        if roll < 0.45:
            kind, prefix, data = "associate_rq", b"", rng.choice([flip_bits, truncate, splice])(rq, rng)
        elif roll < 0.55:
            out = bytearray(rq)
            struct.pack_into(">I", out, 2, rng.choice(INTERESTING_U32))
            kind, prefix, data = "associate_rq_length", b"", bytes(out)
        elif roll < 0.65:
            kind, prefix = "garbage", b""
            data = bytes([rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 0x41, 0xFF])]) + bytes(
                rng.randrange(256) for _ in range(rng.randint(0, 200)))
        else:
            mutate = rng.choice([flip_bits, truncate, splice, lambda d, r: d[:6] + bytes(r.randrange(256) for _ in d[6:])])
            kind, prefix, data = "p_data_after_associate", rq, mutate(echo_p_data(), rng)
        yield kind, prefix, data


def read_pdu(sock: socket.socket, timeout: float) -> bytes | None:
    """One PDU from the node; b"" if it closed; None if nothing came within `timeout`."""
    sock.settimeout(timeout)
    try:
        header = sock.recv(6, socket.MSG_WAITALL)
        if len(header) < 6:
            return b""
        return header + sock.recv(struct.unpack(">I", header[2:6])[0], socket.MSG_WAITALL)
    except TimeoutError:
        return None
    except OSError:
        return b""


PDU_NAMES = {0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF", 0x06: "A-RELEASE-RP",
             0x07: "A-ABORT"}


def send_pdu_case(port: int, prefix: bytes, data: bytes, timeout: float) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if prefix:
            sock.sendall(prefix)
            reply = read_pdu(sock, timeout)
            if not reply or reply[0] != 0x02:
                return "setup refused"
        try:
            sock.sendall(data)
        except OSError:
            return "closed while sending"
        reply = read_pdu(sock, timeout)
    if reply is None:
        return "no answer yet"            # e.g. a truncated PDU: the node waits for the rest
    return "closed" if reply == b"" else PDU_NAMES.get(reply[0], f"PDU 0x{reply[0]:02X}")


# ----- running them against a node ------------------------------------------------------------

@dataclass
class Report:
    cases: int = 0
    by_kind: dict = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    acknowledged: dict = field(default_factory=dict)      # SOP Instance UID -> sha256 of the data set sent
    hangs: list = field(default_factory=list)             # (index, kind, seconds)
    crashed: bool = False
    lost_or_altered: list = field(default_factory=list)
    slowest_s: float = 0.0
    echo_after_s: float | None = None
    memory_before: dict = field(default_factory=dict)
    memory_after: dict = field(default_factory=dict)

    def statuses(self) -> collections.Counter:
        total = collections.Counter()
        for counter in self.by_kind.values():
            total.update(counter)
        return total

    def as_dict(self) -> dict:
        return {"cases": self.cases, "crashed": self.crashed, "hangs": self.hangs,
                "acknowledged": len(self.acknowledged), "lost_or_altered": self.lost_or_altered,
                "slowest_s": round(self.slowest_s, 3), "echo_after_s": self.echo_after_s,
                "statuses": dict(self.statuses()), "by_kind": {k: dict(v) for k, v in self.by_kind.items()},
                "memory_before_kb": self.memory_before, "memory_after_kb": self.memory_after}


def memory_kb(pid: int) -> dict:
    """VmRSS (now) and VmHWM (peak) of a process, in kB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def contexts_for(seeds: list[Seed]) -> list[tuple[str, list[str]]]:
    syntaxes = sorted({str(s.transfer_syntax) for s in seeds} | {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1",
                       "1.2.840.10008.1.2.2", str(DeflatedExplicitVRLittleEndian), "1.2.840.10008.1.2.4.50",
                       "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"})
    return [(sop_class, syntaxes) for sop_class in sorted({s.sop_class for s in seeds})]


def associate(port: int, contexts, timeout: float):
    from pynetdicom import AE

    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class, syntaxes in contexts:
        for syntax in syntaxes:
            ae.add_requested_context(sop_class, syntax)
    return ae.associate("127.0.0.1", port, ae_title="LINKNODE")


def run_datasets(node, seeds: list[Seed], count: int, seed: int, timeout: float, folder: Path,
                 report: Report | None = None) -> Report:
    from pynetdicom import _config

    chunked, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:        # send each case's bytes exactly as they are, not re-encoded by pydicom
        return _run_datasets(node, seeds, count, seed, timeout, folder, report or Report())
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked


def _run_datasets(node, seeds: list[Seed], count: int, seed: int, timeout: float, folder: Path,
                  report: Report) -> Report:
    import hashlib

    from dicom_node.ingest import encode_file_meta

    rng = random.Random(seed)
    contexts = contexts_for(seeds)
    assoc = associate(node.port, contexts, timeout)
    path = folder / "case.dcm"
    for index, case in zip(range(count), dataset_cases(seeds, rng)):
        if node.process.poll() is not None:
            report.crashed = True
            break
        if not assoc.is_established:
            assoc = associate(node.port, contexts, timeout)
        path.write_bytes(b"\0" * 128 + b"DICM" + encode_file_meta(case.sop_class, case.sop_instance,
                                                                    case.transfer_syntax, None) + case.dataset)
        started = time.monotonic()
        try:
            status = assoc.send_c_store(path)
            answer = f"0x{status.Status:04X}" if "Status" in status else "no answer"
        except Exception as error:  # noqa: BLE001 - the sender's own refusal of a case is a result too
            answer = f"not sent: {type(error).__name__}"
        seconds = time.monotonic() - started
        report.slowest_s = max(report.slowest_s, seconds)
        report.cases += 1
        report.by_kind[case.kind][answer] += 1
        if answer == "no answer" and seconds >= timeout * 0.9:
            report.hangs.append((index, case.kind, round(seconds, 1)))
        if answer == "0x0000":
            report.acknowledged[case.sop_instance] = hashlib.sha256(case.dataset).hexdigest()
    if assoc.is_established:
        assoc.release()
    return report


def run_pdus(node, count: int, seed: int, timeout: float, report: Report | None = None) -> Report:
    report = report or Report()
    rng = random.Random(seed)
    rq = captured_associate_rq()
    for index, (kind, prefix, data) in zip(range(count), pdu_cases(rq, rng)):
        if node.process.poll() is not None:
            report.crashed = True
            break
        started = time.monotonic()
        try:
            answer = send_pdu_case(node.port, prefix, data, timeout)
        except OSError as error:
            answer = f"connect failed: {type(error).__name__}"
        report.slowest_s = max(report.slowest_s, time.monotonic() - started)
        report.cases += 1
        report.by_kind[kind][answer] += 1
    return report


def verify_acknowledged(node, acknowledged: dict) -> list[str]:
    """SOP Instance UIDs acknowledged but not stored, or stored with other bytes than were sent."""
    import hashlib

    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    from db.models import Instance

    engine = create_engine(node.settings.database_url)
    with Session(engine) as session:
        paths = dict(session.execute(select(Instance.sop_instance_uid, Instance.path)).all())
    engine.dispose()
    bad = []
    for uid, digest in acknowledged.items():
        path = node.storage / paths[uid] if uid in paths else None
        if path is None or not path.exists() or hashlib.sha256(split_part10(path.read_bytes())[1]).hexdigest() != digest:
            bad.append(uid)
    return bad


def timed_echo(port: int) -> float | None:
    from tests.helpers import echo

    started = time.monotonic()
    answered = echo(port, "ECHOSCU", timeout=10)
    return round(time.monotonic() - started, 3) if answered else None


def fuzz(datasets: int, pdus: int, seed: int, timeout: float, workdir: Path, pdu_timeout: float = 2.0,
         **node_sections) -> dict:
    from tests.helpers import RunningNode, node_config, write_toml

    config = node_config(workdir, **node_sections)
    config["storage"]["fsync"] = False          # throw-away node: the fuzz measures the edge, not the disk
    node = RunningNode(write_toml(workdir / "fuzz-node.toml", config), config).start()
    try:
        seeds = load_seeds()
        before = memory_kb(node.process.pid)
        data_report = run_datasets(node, seeds, datasets, seed, timeout, workdir)
        data_report.memory_before = before
        pdu_report = run_pdus(node, pdus, seed, pdu_timeout)
        crashed = node.process.poll() is not None
        for report in (data_report, pdu_report):
            report.crashed = report.crashed or crashed
        if not crashed:
            data_report.memory_after = memory_kb(node.process.pid)
            pdu_report.echo_after_s = data_report.echo_after_s = timed_echo(node.port)
            data_report.lost_or_altered = verify_acknowledged(node, data_report.acknowledged)
    finally:
        node.stop()
    return {"seed": seed, "datasets": data_report.as_dict(), "pdus": pdu_report.as_dict(),
            "log_bytes": node.log_path.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=int, default=8000)
    parser.add_argument("--pdus", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before an unanswered case is a hang")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dicom-fuzz-") as workdir:
        result = fuzz(args.datasets, args.pdus, args.seed, args.timeout, Path(workdir))
    result["seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    data, pdus = result["datasets"], result["pdus"]
    failed = data["crashed"] or data["hangs"] or data["lost_or_altered"] or data["echo_after_s"] is None
    return 1 if failed or pdus["crashed"] else 0


if __name__ == "__main__":
    sys.exit(main())
