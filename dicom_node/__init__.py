"""dicom-node: a DICOM destination that links patients across mismatched IDs.

`dicom_node` is the network edge (C-ECHO/C-STORE service, scheduler, CLI);
imaging and decision logic live in `linkage` and `models`, storage in `db`.
"""

__version__ = "0.1.0"
