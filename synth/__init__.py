"""Synthetic multi-modality patient cohorts with ground truth, and an image-set importer.

* ``dicom-node synth`` (:mod:`synth.cli`, :func:`synth.cohort.generate`)
  makes persons with stable anatomy, images them over several visits as chest radiograph,
  chest CT, brain MR, fundus photograph and dermoscopy DICOM, adds registration noise and
  injected Patient ID errors, and writes ``truth.json``.
* ``dicom-node convert`` (:mod:`synth.convert`) wraps PNG/JPEG image sets listed in
  a CSV manifest into DICOM.
* :mod:`synth.baseline` scores the naive raw-pixel re-identification baseline.

See docs/synth.md.
"""
