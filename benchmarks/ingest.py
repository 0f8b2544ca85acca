#!/usr/bin/env python3
"""Ingest throughput: the node against DCMTK `storescp` and Orthanc, same machine, same corpus, one run.

    .venv/bin/python benchmarks/ingest.py                   # 500 CT instances, 1/4/8 associations, 3 rounds
    .venv/bin/python benchmarks/ingest.py --corpus cr       # 2,000 small CR images
    .venv/bin/python benchmarks/ingest.py --instances 100 --rounds 1 --json out.json

What it does, all on 127.0.0.1 and all under one temporary directory that is
removed on exit (also on failure or Ctrl-C):

1. Generates the corpus deterministically: N CT Image Storage instances,
   512x512, 16 bit, Explicit VR Little Endian, ~0.5 MB each, a realistic CT
   header, 2 patients x 1 study x 2 series (pydicom + numpy, fixed seeds); or
   (--corpus cr) N Computed Radiography images of 256x256, 16 bit (~0.13 MB),
   one per study, as a stream of small radiographs from many patients.
2. For each scenario (1 association with all N instances; then 4 concurrent
   associations with N/4 each) and each receiver, starts a fresh receiver with
   an empty output directory, sends with DCMTK `storescu` (one process per
   association) and times from the start of the first sender to the exit of
   the last one. Every storescu must exit 0 and every instance must be on disk
   (storescp: files in its output directory; node: rows in its database and
   files in its store), otherwise the run fails.

   Receivers, each at its defaults except where said:
   - storescp: `storescp --fork -dhl -pdu 131072 +B -od DIR PORT` (one process
     per association, no reverse DNS, its largest receive PDU, bit-preserving
     writes straight to disk; no fsync, as always with storescp).
   - Orthanc (Debian's package; left out with a note when `Orthanc` is not on
     PATH): its shipped storage settings, with ports, paths, AE title and no
     plugins set; counted through its REST API (/statistics).
   - node: `python -m dicom_node --config X serve`, durable writes on (file and
     directory fsync, SQLite WAL with synchronous=FULL): the shipped defaults,
     with only the port, the paths and the allow-list set.
   DCMTK tools run with TCP_NODELAY=1 (without it Nagle's algorithm and delayed
   ACKs hold them near 20 instances/s on loopback). Senders connect to
   127.0.0.1 only and the node listens there; storescp 3.6.7 has no option to
   bind one address, so it listens on all interfaces for the seconds it runs.
   The node is measured only once it is idle after start-up (`serve` loads the
   pipeline's models in a thread after it answers C-ECHO); its pipeline stays
   idle during a measurement, as series become stable only after 30 s.
3. Prints instances/s, MB/s (10^6 bytes of the files sent), the receiver's CPU
   milliseconds per instance, node/storescp and node/Orthanc per scenario; the median of --rounds rounds (receivers alternate which goes
   first in each round). --json saves every round, with the node's CPU time
   and how busy the machine was before and during each measurement: on a
   shared machine, other work running beside the benchmark lowers the node's
   numbers much more than storescp's (--quiet-wait waits for a quiet moment).

Optional: --pynetdicom-sender adds the same scenarios with a pynetdicom SCU as
sender (a separate Python process per association), which shows how much of the
gap is the receiver and how much DCMTK's sender; --node-set section.key=value
overrides node settings (e.g. storage.fsync=false) to measure what a setting
costs; --node-root runs the node from another checkout (PYTHONPATH and cwd).

The receivers (starting, readiness, idleness, counting what they stored) live in
benchmarks/ingest_peers.py; this file is the corpus, the senders and the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ingest_peers import (  # receivers and process bookkeeping, benchmarks/ingest_peers.py
    HOST, SENDER_AE, STORESCP_OPTIONS, Processes, Receiver, cpu_jiffies, cpu_seconds, dcmtk_env, machine_busy,
    parse_override, start_node, start_orthanc, start_storescp, tail, wait_quiet)

REPO = Path(__file__).resolve().parent.parent
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
SEED = 20240611


# ----- corpus ----------------------------------------------------------------------


def generate_cr_corpus(root: Path, count: int) -> list[Path]:
    """`count` small CR images, one per study, 1 to 3 studies per patient, byte-identical on every run."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    def uid(*parts) -> str:
        name = "/".join(["dicom-node-ingest-bench-cr", str(SEED), *map(str, parts)])
        return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"

    yy, xx = np.mgrid[0:256, 0:256]
    chest = (((xx - 128) / 110.0) ** 2 + ((yy - 140) / 100.0) ** 2 <= 1.0) * 1800 + 600
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        patient = index // 2
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = CR_IMAGE_STORAGE, uid("instance", index)
        ds.StudyDate = ds.ContentDate = f"2024{1 + index % 12:02d}{1 + index % 28:02d}"
        ds.StudyTime = ds.ContentTime = f"{8 + index % 10:02d}{index % 60:02d}00"
        ds.AccessionNumber = f"CR{index:08d}"
        ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
        ds.StudyDescription, ds.SeriesDescription = "CHEST PA", "PA"
        ds.PatientName, ds.PatientID = f"BENCH^CR{patient:05d}", f"CR-{patient:05d}"
        ds.PatientBirthDate, ds.PatientSex = f"19{40 + patient % 60:02d}0101", "FM"[patient % 2]
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study", index), uid("series", index)
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = str(index), 1, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = 256
        ds.PixelSpacing = ["1.4", "1.4"]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        noise = np.random.default_rng([SEED, index]).normal(0.0, 30.0, (256, 256))
        ds.PixelData = np.clip(chest + noise, 0, 4095).astype("<u2").tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CR_IMAGE_STORAGE, ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = root / f"cr{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def generate_corpus(root: Path, count: int) -> list[Path]:
    """`count` CT instances, 2 patients x 1 study x 2 series, byte-identical on every run."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    def uid(*parts) -> str:
        # 2.25.<UUID as integer> (PS3.5 B.2), name-based so that every run sends the same UIDs.
        # (pydicom's generate_uid(prefix=None, entropy_srcs=...) ignores entropy_srcs: random.)
        name = "/".join(["dicom-node-ingest-bench", str(SEED), *map(str, parts)])
        return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"

    # One soft-tissue phantom (HU + 1024 as stored values, 12 bits stored), per-slice noise.
    yy, xx = np.mgrid[0:512, 0:512]
    body = ((xx - 256) / 220.0) ** 2 + ((yy - 256) / 170.0) ** 2 <= 1.0
    spine = ((xx - 256) / 25.0) ** 2 + ((yy - 350) / 25.0) ** 2 <= 1.0
    base = np.where(body, 1024 + 40, 0).astype(np.int32)
    base[spine] = 1024 + 700

    patients = [("BENCH-0001", "BENCH^ALPHA", "19610203", "F", "063Y"),
                ("BENCH-0002", "BENCH^BRAVO", "19750519", "M", "049Y")]
    series_count = 4
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    series_of = [index * series_count // count for index in range(count)]
    for index in range(count):
        series_index = series_of[index]
        patient_index = series_index // 2
        patient_id, name, birth, sex, age = patients[patient_index]
        slice_number = index - series_of.index(series_index) + 1
        study_uid, series_uid = uid("study", patient_index), uid("series", series_index)
        sop_uid = uid("instance", index)
        z = -400.0 + 1.25 * slice_number

        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceCreationDate, ds.InstanceCreationTime = "20240611", "101500"
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20240611"
        ds.StudyTime, ds.SeriesTime = "101200", f"10{13 + series_index % 2}00"
        ds.AcquisitionTime = ds.ContentTime = f"10{13 + series_index % 2}{slice_number % 60:02d}.{index:06d}"
        ds.AccessionNumber = f"ACC{patient_index + 1:07d}"
        ds.Modality = "CT"
        ds.Manufacturer = "BENCHMARK MEDICAL"
        ds.InstitutionName = "Benchmark Hospital"
        ds.ReferringPhysicianName = "REFERRER^RITA"
        ds.StationName = "CT01"
        ds.StudyDescription = "CT CHEST ABDOMEN PELVIS W CONTRAST"
        ds.SeriesDescription = ["AX 1.25mm SOFT TISSUE", "AX 1.25mm LUNG"][series_index % 2]
        ds.ManufacturerModelName = "BenchScan 128"
        ds.PatientName, ds.PatientID, ds.IssuerOfPatientID = name, patient_id, "BENCH-HOSPITAL"
        ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = birth, sex, age
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = "1.25"
        ds.KVP = "120"
        ds.DataCollectionDiameter = "500"
        ds.SoftwareVersions = "1.0"
        ds.ReconstructionDiameter = "400"
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "160"
        ds.RotationDirection = "CW"
        ds.ExposureTime = "500"
        ds.XRayTubeCurrent = "250"
        ds.Exposure = "125"
        ds.ConvolutionKernel = ["STANDARD", "LUNG"][series_index % 2]
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.StudyID = str(patient_index + 1)
        ds.SeriesNumber = 2 + series_index % 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = slice_number
        ds.ImagePositionPatient = ["-200.0", "-200.0", f"{z:.2f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = uid("frame", patient_index)
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z:.2f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = 512
        ds.PixelSpacing = ["0.78125", "0.78125"]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = ["40", "-600"][series_index % 2], ["400", "1500"][series_index % 2]
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        noise = np.random.default_rng([SEED, index]).normal(0.0, 12.0, (512, 512))
        ds.PixelData = np.clip(base + noise, 0, 4095).astype("<u2").tobytes()

        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1.1.99"
        ds.file_meta.ImplementationVersionName = "INGEST_BENCH"
        path = root / f"s{series_index}" / f"{slice_number:04d}.dcm"
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# ----- senders ---------------------------------------------------------------------


def storescu_argv(receiver: Receiver, files: list[Path]) -> list[str]:
    return ["storescu", "-aet", SENDER_AE, "-aec", receiver.called_ae, HOST, str(receiver.port),
            *map(str, files)]


def pynetdicom_argv(receiver: Receiver, list_file: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "_pysend", str(receiver.port),
            receiver.called_ae, str(list_file)]


def pysend(port: int, called_ae: str, list_file: Path) -> int:
    """One pynetdicom association sending every file in `list_file` (hidden sub-command)."""
    import logging

    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.sop_class import ComputedRadiographyImageStorage, CTImageStorage

    logging.basicConfig(level=logging.WARNING)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    ae.maximum_pdu_size = 0
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 20
    paths = [Path(line) for line in list_file.read_text().splitlines()]
    print("ready", flush=True)
    sys.stdin.readline()
    assoc = ae.associate(HOST, port, ae_title=called_ae)
    if not assoc.is_established:
        print("association not established", file=sys.stderr)
        return 2
    failed = 0
    for path in paths:
        status = assoc.send_c_store(path)
        if not status or status.Status != 0x0000:
            failed += 1
    assoc.release()
    if failed:
        print(f"{failed} C-STORE failed", file=sys.stderr)
    return 1 if failed else 0


@dataclass
class Result:
    sender: str
    receiver: str
    associations: int
    instances: int
    seconds: float
    bytes_sent: int
    round: int
    receiver_cpu_s: float | None = None
    sender_cpu_s: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def per_s(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.bytes_sent / 1e6 / self.seconds


def send(processes: Processes, receiver: Receiver, sender: str, files: list[Path], associations: int,
         workdir: Path, round_index: int, timeout: float, quiet_wait_s: float = 0) -> Result:
    chunks = [files[i * len(files) // associations:(i + 1) * len(files) // associations]
              for i in range(associations)]
    logs = [workdir / f"{sender}-{receiver.name}-{associations}-{i}.log" for i in range(associations)]
    argvs = []
    for i, chunk in enumerate(chunks):
        if sender == "storescu":
            argvs.append(storescu_argv(receiver, chunk))
        else:
            list_file = workdir / f"files-{associations}-{i}.txt"
            list_file.write_text("\n".join(map(str, chunk)) + "\n")
            argvs.append(pynetdicom_argv(receiver, list_file))
    handles = [open(log, "wb") for log in logs]  # noqa: SIM115 (closed in the finally below)
    busy_before = wait_quiet(quiet_wait_s) if quiet_wait_s > 0 else machine_busy()
    jiffies_before = cpu_jiffies()
    cpu_before = cpu_seconds(receiver.process.pid)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        if sender == "storescu":
            start = time.perf_counter()
            senders = [processes.start(argv, stdout=handle, stderr=subprocess.STDOUT, env=dcmtk_env())
                       for argv, handle in zip(argvs, handles)]
        else:
            # Python start-up and imports are not part of the transfer: each sender
            # says "ready" once loaded and starts associating on "go".
            senders = [processes.start(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=handle,
                                       env=dcmtk_env()) for argv, handle in zip(argvs, handles)]
            for process in senders:
                if process.stdout.readline().strip() != b"ready":
                    raise RuntimeError(f"pynetdicom sender did not start:\n{tail(logs[senders.index(process)])}")
            start = time.perf_counter()
            for process in senders:
                process.stdin.write(b"go\n")
                process.stdin.close()
        deadline = time.monotonic() + timeout
        for process in senders:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{sender} -> {receiver.name} did not finish within {timeout:.0f}s") from None
        seconds = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.close()
    jiffies_after = cpu_jiffies()
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_after = cpu_seconds(receiver.process.pid)
    for process in senders:
        if process.stdout:
            process.stdout.close()
        processes.running.remove(process)
    bad = [(i, p.returncode) for i, p in enumerate(senders) if p.returncode != 0]
    if bad:
        raise RuntimeError(f"{sender} -> {receiver.name}: sender(s) failed {bad}:\n"
                           + "\n".join(tail(logs[i], 10) for i, _ in bad) + "\n" + tail(receiver.log))
    stored = receiver.stored()
    if stored != len(files):
        raise RuntimeError(f"{receiver.name} holds {stored} of {len(files)} instances after {sender}:\n"
                           + tail(receiver.log))
    sender_cpu = (children_after.ru_utime + children_after.ru_stime
                  - children_before.ru_utime - children_before.ru_stime)
    return Result(sender, receiver.name, associations, len(files), seconds,
                  sum(f.stat().st_size for f in files), round_index,
                  receiver_cpu_s=None if cpu_before is None or cpu_after is None else cpu_after - cpu_before,
                  sender_cpu_s=sender_cpu,
                  extra={"machine_busy_before": round(busy_before, 3),
                         "machine_busy_during": round((jiffies_after[0] - jiffies_before[0])
                                                      / max(1, jiffies_after[1] - jiffies_before[1]), 3)})


# ----- the run ---------------------------------------------------------------------


def run(args: argparse.Namespace, processes: Processes, root: Path) -> list[Result]:
    print(f"generating {args.instances} {args.corpus.upper()} instances ...", flush=True)
    started = time.perf_counter()
    generate = generate_cr_corpus if args.corpus == "cr" else generate_corpus
    files = generate(root / "corpus", args.instances)
    total = sum(f.stat().st_size for f in files)
    print(f"  {len(files)} files, {total / 1e6:.1f} MB, {time.perf_counter() - started:.1f}s", flush=True)
    for path in files:  # same warm page cache for every receiver
        path.read_bytes()

    senders = ["storescu"] + (["pynetdicom"] if args.pynetdicom_sender else [])
    results = []
    run_index = 0
    for round_index in range(args.rounds):
        for sender in senders:
            for associations in args.associations:
                order = ["storescp", "orthanc", "node"]
                order = order if round_index % 2 == 0 else order[::-1]
                order = [name for name in order if name in args.receivers]
                for name in order:
                    run_index += 1
                    workdir = root / f"run{run_index:03d}-{name}"
                    if name == "storescp":
                        workdir.mkdir()
                        receiver = start_storescp(processes, workdir)
                    elif name == "orthanc":
                        receiver = start_orthanc(processes, workdir)
                    else:
                        receiver = start_node(processes, workdir, args.node_root, args.node_set)
                    os.sync()  # nothing left to write back from earlier runs
                    try:
                        result = send(processes, receiver, sender, files, associations, workdir,
                                      round_index, args.timeout, args.quiet_wait)
                    except RuntimeError as error:
                        if sender == "storescu":
                            raise
                        # The optional pynetdicom SCU itself sometimes loses a C-STORE-RSP with
                        # several associations in flight (pynetdicom 3.0.4: "Received unexpected
                        # C-STORE service message", then DIMSE timeout); report, do not abort.
                        print(f"  round {round_index + 1} {sender:>10} -> {name:<8} x{associations}: "
                              f"FAILED, left out: {str(error).splitlines()[0]}", flush=True)
                        continue
                    finally:
                        processes.stop(receiver.process)
                    results.append(result)
                    cpu = f", {name} CPU {result.receiver_cpu_s:.1f}s" if result.receiver_cpu_s else ""
                    busy = result.extra["machine_busy_before"], result.extra["machine_busy_during"]
                    print(f"  round {round_index + 1} {sender:>10} -> {name:<8} x{associations}: "
                          f"{result.seconds:6.2f}s {result.per_s:7.1f} inst/s{cpu} "
                          f"(machine busy {busy[0]:.0%} before, {busy[1]:.0%} during)", flush=True)
                    if not args.keep:
                        shutil.rmtree(workdir, ignore_errors=True)
    return results


RECEIVERS = ("storescp", "orthanc", "node")


def summarize(results: list[Result]) -> list[dict]:
    rows = []
    keys = sorted({(r.sender, r.associations) for r in results},
                  key=lambda k: (k[0] != "storescu", k[1]))
    for sender, associations in keys:
        medians = {}
        for receiver in RECEIVERS:
            runs = [r for r in results if (r.sender, r.associations, r.receiver) == (sender, associations, receiver)]
            if not runs:
                continue
            seconds = statistics.median(r.seconds for r in runs)
            cpu = [r.receiver_cpu_s for r in runs if r.receiver_cpu_s is not None]
            medians[receiver] = row = {
                "sender": sender, "receiver": receiver, "associations": associations,
                "instances": runs[0].instances, "seconds": seconds,
                "instances_per_s": runs[0].instances / seconds,
                "mb_per_s": runs[0].bytes_sent / 1e6 / seconds,
                "rounds": [round(r.seconds, 3) for r in runs],
                "receiver_cpu_s": statistics.median(cpu) if cpu else None,
                "cpu_ms_per_instance": 1000 * statistics.median(cpu) / runs[0].instances if cpu else None,
                "busy_rounds": sum(r.extra.get("machine_busy_before", 0) > 0.2 for r in runs),
            }
            rows.append(row)
        for peer in ("storescp", "orthanc"):
            if peer in medians and "node" in medians:
                medians["node"][f"node_per_{peer}"] = (medians["node"]["instances_per_s"]
                                                        / medians[peer]["instances_per_s"])
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'sender':<10} {'receiver':<9} {'assoc':>5} {'inst':>5} {'seconds':>8} {'inst/s':>8} " \
             f"{'MB/s':>7} {'CPU ms/inst':>11} {'node/storescp':>13} {'node/Orthanc':>12}"
    print()
    print(header)
    print("-" * len(header))
    for row in rows:
        cpu = f"{row['cpu_ms_per_instance']:.1f}" if row["cpu_ms_per_instance"] is not None else ""
        ratios = [f"{row[key]:.2f}" if key in row else "" for key in ("node_per_storescp", "node_per_orthanc")]
        print(f"{row['sender']:<10} {row['receiver']:<9} {row['associations']:>5} {row['instances']:>5} "
              f"{row['seconds']:>8.2f} {row['instances_per_s']:>8.1f} {row['mb_per_s']:>7.1f} {cpu:>11} "
              f"{ratios[0]:>13} {ratios[1]:>12}")
    print()
    busy = [row for row in rows if row.get("busy_rounds")]
    if busy:
        print("warning: other work kept the machine >20% busy at the start of "
              + ", ".join(f"{row['busy_rounds']}/{len(row['rounds'])} {row['sender']}->{row['receiver']} "
                          f"x{row['associations']}" for row in busy)
              + " measurements; numbers are lower than on an idle machine")
    for row in rows:
        if row["receiver"] == "node" and "node_per_storescp" in row:
            verdict = "met" if row["node_per_storescp"] >= 1.0 else "NOT met"
            print(f"{row['sender']} x{row['associations']}: node/storescp = {row['node_per_storescp']:.2f} "
                  f"(target >= 1.0: {verdict})")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_pysend"]:
        return pysend(int(argv[1]), argv[2], Path(argv[3]))

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", choices=["ct", "cr"], default="ct",
                        help="ct: 512x512 CT slices (~0.5 MB); cr: small 256x256 radiographs (~0.13 MB)")
    parser.add_argument("--instances", type=int, default=None,
                        help="corpus size (default 500 CT or 2000 CR)")
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4, 8],
                        help="scenarios: concurrent associations (default: 1 4 8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the table shows medians (default 3)")
    parser.add_argument("--receivers", nargs="+", choices=list(RECEIVERS), default=list(RECEIVERS),
                        help="receivers to measure (default: all three; Orthanc is left out with a note when "
                             "it is not installed)")
    parser.add_argument("--json", type=Path, help="save every measurement and the summary here")
    parser.add_argument("--pynetdicom-sender", action="store_true",
                        help="also send with a pynetdicom SCU (extra rows)")
    parser.add_argument("--node-set", type=parse_override, action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a node setting, e.g. storage.fsync=false (repeatable)")
    parser.add_argument("--node-root", type=Path, default=REPO,
                        help="checkout to run the node from (default: this one)")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary directory")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per scenario")
    parser.add_argument("--quiet-wait", type=float, default=30, metavar="S",
                        help="before each measurement wait up to S seconds for other work to leave the "
                             "cores >= 80%% idle (0: do not wait; default 30)")
    parser.add_argument("--keep", action="store_true", help="keep received files (debugging)")
    args = parser.parse_args(argv)
    if args.instances is None:
        args.instances = 2000 if args.corpus == "cr" else 500
    if "orthanc" in args.receivers and shutil.which("Orthanc") is None:
        print("Orthanc is not on PATH (apt-get install orthanc): measuring without it", flush=True)
        args.receivers = [name for name in args.receivers if name != "orthanc"]
    if args.instances < max(args.associations):
        parser.error("--instances must be at least the number of associations")
    for tool in ("storescp", "storescu"):
        if shutil.which(tool) is None:
            parser.error(f"DCMTK's {tool} is not on PATH (apt-get install dcmtk)")
    args.node_root = args.node_root.resolve()

    processes = Processes()
    root = Path(tempfile.mkdtemp(prefix="ingest-bench-", dir=args.workdir))

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        results = run(args, processes, root)
    finally:
        processes.stop_all()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")
    rows = summarize(results)
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()},
            "storescp_options": STORESCP_OPTIONS,
            "node_overrides": [f"{s}.{k}={v}" for s, k, v in args.node_set],
            "summary": rows,
            "runs": [{**asdict(r), "instances_per_s": r.per_s, "mb_per_s": r.mb_per_s} for r in results],
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
