"""Imaging models: series loading, per-route MONAI normalization, the router and identity networks.

Filled by the imaging-pipeline milestone.
"""
