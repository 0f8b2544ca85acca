"""Session-scoped synthetic cohorts shared by the synth tests (generated once, in-process)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from synth.cli import main as synth_main

SMALL = ["--patients", "8", "--visits", "2", "--seed", "11", "--preset", "small",
         "--error-rate", "0.3", "--twin-rate", "0.3", "--sites", "3"]


def _make(root: Path, name: str, args: list[str]) -> Path:
    out = root / name
    rc = synth_main(["synth", "--out", str(out), "--quiet", *args])
    assert rc == 0, f"synth {' '.join(args)} exited {rc}"
    return out


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory) -> Path:
    """8 persons x 2 visits x all modalities, small sizes, many injected errors (2 workers)."""
    return _make(tmp_path_factory.mktemp("synth"), "small", SMALL + ["--jobs", "2"])


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
