"""Imaging models, in three layers that import downwards only (checked by import-linter, setup.cfg):

* ``models.inference``: what ``dicom-node serve`` needs: loading, transforms, networks, the
  router, the anatomy gate, the pipeline (where a series becomes an embedding), calibration and
  the geometric check.
* ``models.datasets``: labelled image sets (manifests, archive series, synthetic cohorts).
* ``models.evaluation``: scoring a model on a labelled set, metrics, baselines, reports.
* ``models.training``: training identity networks and the router, adaptation, fusion.
* ``models.cli``: the ``dicom-node`` subcommands for the above.

``models/weights/`` holds the shipped model folders (card.json + model.pt per route).
"""
