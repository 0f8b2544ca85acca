"""What the running node needs of the models: DICOM and picture loading, per-route transforms,
networks (incl. pretrained backbones and fused models), the router, the anatomy gate, the series
pipeline (models.inference.pipeline), calibration and the geometric check. Imports only ``db``
records and the node's settings; nothing here imports training or evaluation."""
