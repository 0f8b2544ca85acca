"""Split a DICOM Part 10 file into its transfer syntax and the encoded data set."""

from __future__ import annotations

from io import BytesIO

from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble

from dicom_node.statuses import IngestFailure, Status


def split_part10(raw: bytes) -> tuple[str, bytes]:
    """Return (transfer syntax UID, data set bytes exactly as in the file)."""
    stream = BytesIO(raw)
    try:
        read_preamble(stream, force=False)
        meta = _read_file_meta_info(stream)
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError) as error:
        raise IngestFailure(Status.CANNOT_PARSE, f"not a DICOM Part 10 file: {error}") from None
    transfer_syntax = meta.get("TransferSyntaxUID")
    if not transfer_syntax:
        raise IngestFailure(Status.CANNOT_PARSE, "file meta has no Transfer Syntax UID")
    return str(transfer_syntax), raw[stream.tell():]


def _comparable(raw: bytes):
    import pydicom

    ds = pydicom.dcmread(BytesIO(raw))
    # Senders may drop group lengths and trailing padding when re-encoding
    # (DCMTK does); neither carries content.
    for tag in [t for t in ds.keys() if t.element == 0 or t == 0xFFFCFFFC]:
        del ds[tag]
    return str(ds.file_meta.TransferSyntaxUID), ds


def same_content(stored_file: bytes, transfer_syntax: str, dataset: bytes, meta: bytes) -> bool:
    """Whether a re-sent object carries the same elements as the stored one.

    Only called when the bytes differ, which is rare; it decodes both headers
    and compares element values (pixel data as encoded bytes, never decoded).
    """
    try:
        ts_a, ds_a = _comparable(stored_file)
        ts_b, ds_b = _comparable(b"\x00" * 128 + b"DICM" + meta + dataset)
    except Exception:  # unreadable either side: not provably the same
        return False
    return ts_a == ts_b == str(transfer_syntax) and ds_a == ds_b
