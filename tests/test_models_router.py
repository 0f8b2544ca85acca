"""The router: header rules, shipped image weights, their combination and the findings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.inference.loading import load_series
from models.inference.networks import sha256_file
from models.inference.router import Router, header_rule
from models.inference.transforms import ROUTES, router_thumbnail
from tests.helpers import TEST_FILES
from tests.test_models_loading import first, make_cohort

ROUTER_WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "weights" / "router"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> list[dict]:
    # Seed 11: persons the router never saw (training cohorts use seeds >= 1000).
    series = make_cohort(tmp_path_factory.mktemp("cohort"), patients=2, seed=11)
    for s in series:
        s["loaded"] = load_series(s["files"])
    return series


@pytest.fixture(scope="module")
def trained() -> Router:
    router = Router.load(ROUTER_WEIGHTS)
    assert router.net is not None, "shipped router weights missing in models/weights/router"
    return router


def decide(router: Router, s: dict, modality="header", body_part="header"):
    loaded = s["loaded"]
    probabilities = None
    if router.net is not None:
        probabilities = router.image_probabilities(router_thumbnail(loaded)[None])[0]
    return router.decide(loaded.kind, s["modality"] if modality == "header" else modality,
                         s["body_part"] if body_part == "header" else body_part, probabilities)


@pytest.mark.parametrize("modality,body_part,route", [
    ("CR", "CHEST", "chest_xr"), ("DX", "THORAX", "chest_xr"), ("CT", "CHEST", "chest_ct"),
    ("MR", "BRAIN", "brain_mr"), ("MR", "HEAD", "brain_mr"), ("OP", "EYE", "fundus"), ("OP", None, "fundus"),
    ("XC", "EYE", "fundus"), ("DMS", "SKIN", "dermoscopy"), ("XC", "SKIN", "dermoscopy"),
    ("CR", "HAND", "other"), ("CT", "ABDOMEN", "other"), ("US", None, "other"), ("dx", "chest", "chest_xr"),
])
def test_header_rules(modality, body_part, route):
    assert header_rule(modality, body_part).route == route


def test_header_rule_confidence_reflects_what_the_header_says():
    assert header_rule("CR", "CHEST").confidence > header_rule("CR", None).confidence
    assert header_rule("CT", None).confidence < 0.5
    assert header_rule(None, "CHEST") is None and header_rule("", None) is None


def test_header_only_routes_every_synthetic_modality(cohort):
    router = Router(min_confidence=0.5)
    for s in cohort:
        decision = decide(router, s)
        assert (decision.route, decision.source, decision.linkable) == (s["route"], "header", True), s["synth"]
        assert decision.confidence == header_rule(s["modality"], s["body_part"]).confidence


def test_shipped_weights_route_every_synthetic_modality(cohort, trained):
    for s in cohort:
        combined = decide(trained, s)
        assert (combined.route, combined.source, combined.linkable) == (s["route"], "image+header", True), s["synth"]
        assert combined.confidence >= 0.9 and not combined.findings
        image_only = decide(trained, s, modality=None, body_part=None)
        assert (image_only.route, image_only.source) == (s["route"], "image"), s["synth"]


def test_pydicom_images_that_fit_no_route_go_to_other(trained):
    for name in ("examples_palette.dcm", "examples_ybr_color.dcm", "CT_small.dcm"):
        loaded = load_series([TEST_FILES / name])
        probabilities = trained.image_probabilities(router_thumbnail(loaded)[None])[0]
        decision = trained.decide(loaded.kind, loaded.modality, loaded.body_part, probabilities)
        assert decision.route == "other" and not decision.linkable, name


def test_mislabelled_header_is_a_finding(cohort, trained):
    ct = first(cohort, "ct")
    decision = decide(trained, ct, modality="MR", body_part="HEAD")
    expected = "header says MR/HEAD (brain_mr) but the image looks like chest_ct"
    assert any(f.startswith(expected) for f in decision.findings)
    assert decision.route == "chest_ct"
    cxr = first(cohort, "cxr")
    decision = decide(trained, cxr, modality="CR", body_part="HAND")
    assert any(f.startswith("header says CR/HAND (other) but the image looks like chest_xr") for f in decision.findings)


def test_route_the_series_cannot_take_is_a_finding():
    loaded = load_series([TEST_FILES / "CT_small.dcm"])     # one CT slice: a 2D image, not a volume
    decision = Router().decide(loaded.kind, "CT", "CHEST")
    assert decision.route == "other" and not decision.linkable
    assert any("header says CT/CHEST (chest_ct) but the series is a 2D grayscale image" in f for f in decision.findings)


def test_low_confidence_and_other_are_not_linkable():
    decision = Router(min_confidence=0.5).decide("volume", "CT", None)
    assert decision.route == "chest_ct" and decision.confidence == 0.4 and not decision.linkable
    assert any("below 0.50" in f for f in decision.findings)
    other = Router().decide("gray", "CR", "KNEE")
    assert other.route == "other" and not other.linkable and any("route other" in f for f in other.findings)
    unknown = Router().decide("gray", None, None)
    assert unknown.route == "other" and unknown.confidence == 0.0 and not unknown.linkable


def test_image_and_header_are_combined():
    router = Router()
    image = np.array([0.97, 0.0, 0.0, 0.01, 0.01, 0.01])            # looks like chest_xr
    agree = router.decide("gray", "CR", "CHEST", image)
    assert agree.route == "chest_xr" and agree.confidence > 0.99
    disagree = router.decide("gray", "CR", "HAND", image)            # header says other (0.9)
    assert disagree.source == "image+header" and disagree.confidence < agree.confidence


def test_shipped_router_card(trained):
    card = json.loads((ROUTER_WEIGHTS / "card.json").read_text())
    model = ROUTER_WEIGHTS / "model.pt"
    assert model.stat().st_size < 2_000_000
    assert card["sha256"] == sha256_file(model)
    assert card["classes"] == list(ROUTES)
    assert card["heldout"]["accuracy"] >= 0.9
    assert len(card["heldout"]["confusion"]["matrix"]) == len(ROUTES)
    for key in ("training_data", "date", "version", "limitations"):
        assert card[key]
    assert trained.net(torch.zeros(1, 3, 64, 64)).shape == (1, len(ROUTES))
