"""The node's File Meta Information encoder writes what pydicom's `write_file_meta_info` writes."""

from __future__ import annotations

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from dicom_node.ingest import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION, encode_file_meta


def pydicom_meta(sop_class, sop_instance, transfer_syntax, source_ae) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue()


@pytest.mark.parametrize("source_ae", [None, "STORESCU", "ODD", "A" * 16])
@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, JPEG2000Lossless, "1.2.840.10008.1.2"])
def test_the_file_meta_equals_pydicoms(source_ae, transfer_syntax):
    for sop_instance in (generate_uid(), "1.2.3", "1.2.34", "2.25." + "9" * 58):     # odd and even lengths
        ours = encode_file_meta(CTImageStorage, sop_instance, transfer_syntax, source_ae)
        assert ours == pydicom_meta(CTImageStorage, sop_instance, transfer_syntax, source_ae)
