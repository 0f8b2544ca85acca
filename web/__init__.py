"""Web pages and JSON API for archivists and clinicians (served inside `dicom-node serve`)."""
