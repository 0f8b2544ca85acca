"""The shipped identity models: loadable, checked, and versioned so that embeddings made in another way
(another network or other test-time views) never share a model version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.inference.networks import TEST_TIME_VIEWS, load_identity_model, sha256_file

WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "weights"
ROUTES = ("chest_xr", "chest_ct", "brain_mr", "fundus", "dermoscopy")


@pytest.mark.parametrize("route", ROUTES)
def test_shipped_identity_model(route):
    card = json.loads((WEIGHTS / route / "card.json").read_text(encoding="utf-8"))
    assert card["sha256"] == sha256_file(WEIGHTS / route / "model.pt")
    assert (WEIGHTS / route / "model.pt").stat().st_size <= 30e6
    model = load_identity_model(route, WEIGHTS, torch.device("cpu"))
    assert model.version == card["version"]
    # the stored model_version must change whenever the embedding does: the views are part of it
    # (a fused model's version carries a digest of its members, their views included)
    if (card["arch"] or {}).get("fusion"):
        members = card["arch"]["fusion"]
        assert len(members) >= 2 and all(m["test_time_views"] in TEST_TIME_VIEWS for m in members)
        assert "-fused-" in card["version"]
    else:
        assert model.views in TEST_TIME_VIEWS and card["version"].endswith(f"+{card['test_time_views']}")
    assert card["calibration"]["fitted_on"].startswith("held-out pairs")
    assert card["metrics"]["heldout"]


def test_shipped_versions_are_distinct():
    versions = [json.loads((WEIGHTS / r / "card.json").read_text(encoding="utf-8"))["version"] for r in ROUTES]
    assert len(set(versions)) == len(versions)
