"""The node as a subprocess, against real DICOM peers: DCMTK's tools and a pynetdicom SCU."""

from __future__ import annotations

import subprocess
import uuid
import zlib
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from db.models import Instance
from dicom_node.ingest import encode_file_meta
from tests.helpers import CORPUS, corpus_path, dataset_bytes, echo, need

pytestmark = pytest.mark.dcmtk


def stored_instances(node) -> dict[str, Instance]:
    engine = create_engine(node.settings.database_url)
    with Session(engine) as session:
        found = {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
    engine.dispose()
    return found


def meta(path: Path):
    return pydicom.dcmread(path, stop_before_pixels=True)


def associate(node, contexts, ae_title: str = "PYNETDICOM"):
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="LINKNODE")
    assert assoc.is_established, node.log()
    return assoc


@pytest.fixture(autouse=True)
def send_files_as_they_are(monkeypatch):
    """Make pynetdicom stream a file's data set bytes unchanged (it decodes and
    re-encodes them otherwise), so what the node stores can be compared byte for byte."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def send_raw(assoc, folder: Path, data: bytes, sop_class: str, sop_instance: str, transfer_syntax: str):
    """A C-STORE carrying exactly `data`, so malformed data sets can be sent on purpose."""
    path = folder / f"{uuid.uuid4().hex}.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + encode_file_meta(sop_class, sop_instance, transfer_syntax, None) + data)
    return assoc.send_c_store(path)


def test_echoscu_succeeds_and_unknown_ae_titles_are_rejected(start_node):
    echoscu = need("echoscu")
    node = start_node()
    ok = subprocess.run([echoscu, "-aec", "LINKNODE", "127.0.0.1", str(node.port)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([echoscu, "-aet", "INTRUDER", "-aec", "LINKNODE", "127.0.0.1", str(node.port)],
                         capture_output=True, text=True)
    assert bad.returncode != 0
    assert "Calling AE Title Not Recognized" in bad.stderr + bad.stdout
    assert "INTRUDER" in node.log() and "allow-list" in node.log()


def test_host_check_rejects_a_known_ae_title_from_another_address(start_node):
    node = start_node(security={"require_known_ae": True,
                                "peers": [{"ae_title": "ECHOSCU", "hosts": ["192.0.2.10"]}]})
    assert not echo(node.port, "ECHOSCU")


def assert_same_content(sent_path: Path, stored_path: Path) -> None:
    """DCMTK re-encodes (drops group lengths and padding, may change an
    uncompressed syntax); every element and every pixel must survive."""
    sent, on_disk = pydicom.dcmread(sent_path), pydicom.dcmread(stored_path)
    for element in sent:
        if element.tag.element != 0 and element.tag not in (0xFFFCFFFC, 0x7FE00010):
            assert on_disk[element.tag] == element, f"{sent_path.name}: {element.tag} differs"
    if on_disk.file_meta.TransferSyntaxUID != sent.file_meta.TransferSyntaxUID:
        assert not sent.file_meta.TransferSyntaxUID.is_compressed, sent_path.name
    if "PixelData" in sent and on_disk.PixelData != sent.PixelData:
        # DCMTK pads odd-length fragments; the decoded pixels must be the same.
        assert (on_disk.pixel_array == sent.pixel_array).all(), f"{sent_path.name}: pixels differ"


# pydicom's corpus holds the same MR image (one SOP Instance UID) in several
# transfer syntaxes; with duplicate_policy "replace" each version is stored and
# checked right after it is acknowledged, and the earlier ones are kept under superseded/.
REPLACE = {"storage": {"duplicate_policy": "replace"}}

STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": "-xi", "1.2.840.10008.1.2.1": "-xe", "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd", "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.5": "-xr",
}


def test_storescu_sends_every_transfer_syntax_and_all_acknowledged_are_stored(start_node):
    storescu = need("storescu")
    node = start_node(**REPLACE)
    for path in [corpus_path(kind) for kind in sorted(CORPUS)]:
        # One association per file, proposing the file's own syntax first so
        # compressed data travels as it is (DCMTK would otherwise convert it).
        option = STORESCU_PROPOSE[str(meta(path).file_meta.TransferSyntaxUID)]
        run = subprocess.run([storescu, option, "-aec", "LINKNODE", "127.0.0.1", str(node.port), str(path)],
                             capture_output=True, text=True, env={"TCP_NODELAY": "1"}, timeout=60)
        assert run.returncode == 0, path.name + run.stderr + node.log()
        sent = meta(path)
        row = stored_instances(node)[sent.SOPInstanceUID]
        assert_same_content(path, node.storage / row.path)
        assert row.transfer_syntax_uid == str(sent.file_meta.TransferSyntaxUID) or \
            not sent.file_meta.TransferSyntaxUID.is_compressed
        assert row.calling_ae == "STORESCU"


def test_pynetdicom_scu_files_are_stored_byte_identical(start_node):
    node = start_node(**REPLACE)
    files = [corpus_path(kind) for kind in sorted(CORPUS)]
    headers = [meta(path) for path in files]
    # One presentation context per (SOP class, transfer syntax): each file travels in its own syntax.
    contexts = sorted({(h.SOPClassUID, str(h.file_meta.TransferSyntaxUID)) for h in headers})
    assoc = associate(node, [(cls, [ts]) for cls, ts in contexts])
    for path, header in zip(files, headers):
        status = assoc.send_c_store(path)  # a path is sent as its raw bytes, never decoded
        assert status.Status == 0x0000, (path.name, node.log())
        row = stored_instances(node)[header.SOPInstanceUID]
        received, original = dataset_bytes(node.storage / row.path), dataset_bytes(path)
        if header.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
            # pynetdicom re-deflates a deflated file when sending it; compare what it carries.
            received, original = inflate(received), inflate(original)
        assert received == original, path.name
        assert row.transfer_syntax_uid == str(header.file_meta.TransferSyntaxUID)
    assoc.release()
    unique = {h.SOPInstanceUID for h in headers}
    assert len(stored_instances(node)) == len(unique)
    assert len(list((node.storage / "superseded").iterdir())) == len(files) - len(unique)


def inflate(data: bytes) -> bytes:
    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(data)


def test_malformed_instances_fail_with_their_status_and_the_association_goes_on(start_node, tmp_path):
    node = start_node()
    good = corpus_path("explicit_le")
    ct = meta(good)
    ct_class, ts = ct.SOPClassUID, str(ct.file_meta.TransferSyntaxUID)
    mr_class = "1.2.840.10008.5.1.4.1.1.4"
    assoc = associate(node, [(ct_class, [ts]), (mr_class, [ts]), (Verification, None)])
    data = dataset_bytes(good)

    truncated = send_raw(assoc, tmp_path, data[:-500], ct_class, ct.SOPInstanceUID, ts)
    assert truncated.Status == 0xC000 and "truncated" in truncated.ErrorComment

    no_uids = pydicom.dcmread(good)
    del no_uids.StudyInstanceUID
    no_uids.SOPInstanceUID = generate_uid()
    buffer = BytesIO()
    no_uids.save_as(buffer, enforce_file_format=True)
    missing = send_raw(assoc, tmp_path, dataset_bytes_from(buffer.getvalue()), ct_class, no_uids.SOPInstanceUID, ts)
    assert missing.Status == 0xC001 and "Study Instance UID" in missing.ErrorComment

    wrong_class = send_raw(assoc, tmp_path, data, mr_class, ct.SOPInstanceUID, ts)
    assert wrong_class.Status == 0xA900

    garbage = send_raw(assoc, tmp_path, b"\x08\x00\x16\x00UI\xff\xffnot dicom", ct_class, generate_uid(), ts)
    assert garbage.Status in (0xC000, 0xC001)

    # Same association: an echo and a good instance still work.
    assert assoc.send_c_echo().Status == 0x0000
    assert send_raw(assoc, tmp_path, data, ct_class, ct.SOPInstanceUID, ts).Status == 0x0000
    assoc.release()
    assert list(stored_instances(node)) == [ct.SOPInstanceUID]
    assert not [p for p in (node.storage / "tmp").rglob("*") if p.is_file()]


def dataset_bytes_from(part10: bytes) -> bytes:
    from dicom_node.part10 import split_part10

    return split_part10(part10)[1]


def test_identical_resend_over_the_network_is_acknowledged_once(start_node):
    storescu = need("storescu")
    node = start_node()
    path = str(corpus_path("explicit_le"))
    for _ in range(2):
        run = subprocess.run([storescu, "-aec", "LINKNODE", "127.0.0.1", str(node.port), path],
                             capture_output=True, text=True, env={"TCP_NODELAY": "1"}, timeout=60)
        assert run.returncode == 0, run.stderr
    assert len(stored_instances(node)) == 1
    assert len(list(node.storage.rglob("*.dcm"))) == 1


def test_logs_do_not_show_patient_ids_or_names(start_node):
    storescu = need("storescu")
    node = start_node(node={"log_level": "DEBUG"})
    ds = pydicom.dcmread(corpus_path("explicit_le"))
    subprocess.run([storescu, "-aec", "LINKNODE", "127.0.0.1", str(node.port), str(corpus_path("explicit_le"))],
                   check=True, capture_output=True, env={"TCP_NODELAY": "1"}, timeout=60)
    node.stop()
    log = node.log()
    assert "stored" in log
    assert str(ds.PatientID) not in log
    assert str(ds.PatientName).split("^")[0] not in log


def test_associations_beyond_the_maximum_are_rejected_and_served_after(start_node):
    node = start_node(node={"max_associations": 1})
    first = associate(node, [(Verification, None)])
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(Verification)
    second = ae.associate("127.0.0.1", node.port, ae_title="LINKNODE")
    assert second.is_rejected
    assert first.send_c_echo().Status == 0x0000
    first.release()
    assert echo(node.port)
