"""Labelled image sets for training and evaluation: manifests of images or DICOM series,
the archive's stored series, and manifests of synthetic cohorts."""
