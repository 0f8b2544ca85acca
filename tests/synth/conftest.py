"""Session-scoped synthetic cohorts shared by the synth tests (generated once, in-process); `small_cohort`
is in tests/conftest.py, shared with the privacy audit's tests."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import SMALL_COHORT as SMALL
from tests.helpers import make_cohort as _make


@pytest.fixture(scope="session")
def small_cohort_serial(tmp_path_factory) -> Path:
    """The same cohort generated again in a single process."""
    return _make(tmp_path_factory.mktemp("synth"), "small_serial", SMALL + ["--jobs", "1"])


@pytest.fixture(scope="session")
def truth(small_cohort) -> dict:
    return json.loads((small_cohort / "truth.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def default_cohort(tmp_path_factory) -> Path:
    """Default sizes and nuisances: 16 persons x 3 visits x all modalities."""
    return _make(tmp_path_factory.mktemp("synth"), "default",
                 ["--patients", "16", "--visits", "3", "--seed", "21", "--jobs", "2"])


@pytest.fixture(scope="session")
def still_cohort(tmp_path_factory) -> Path:
    """No visit nuisance (--nuisance 0) and no injected errors: only anatomy, disease and noise."""
    return _make(tmp_path_factory.mktemp("synth"), "still",
                 ["--patients", "16", "--visits", "3", "--seed", "21", "--preset", "small",
                  "--nuisance", "0", "--error-rate", "0", "--jobs", "2"])
