"""Seeded structured fuzzing of the DICOM edge (benchmarks/fuzz.py) against a node started here:
a few hundred mutated data sets and PDUs; the benchmark runs thousands (docs/robustness.md)."""

from __future__ import annotations

import pytest

from tests.helpers import load_benchmark

fuzz = load_benchmark("fuzz")
pytestmark = pytest.mark.slow


def test_mutated_data_sets_and_pdus_never_crash_hang_or_lose_an_acknowledged_instance(tmp_path):
    result = fuzz.fuzz(datasets=200, pdus=80, seed=7, timeout=20.0, workdir=tmp_path, pdu_timeout=0.5)
    data, pdus = result["datasets"], result["pdus"]
    assert not data["crashed"] and not pdus["crashed"]
    assert data["hangs"] == [] and data["slowest_s"] < 10
    assert data["acknowledged"] > 0 and data["lost_or_altered"] == []
    # Every refusal says what is wrong with the data set: none is an internal error.
    assert "0x0110" not in data["statuses"] and "no answer" not in data["statuses"]
    assert set(data["statuses"]) <= {"0x0000", "0xA700", "0xA900", "0xC000", "0xC001", "0xC002"}
    # The node still answers at once, and logged no tracebacks for any of it.
    assert data["echo_after_s"] is not None and data["echo_after_s"] < 1.0
    log = (tmp_path / "fuzz-node.log").read_text(errors="replace")
    assert "Traceback" not in log
    assert result["log_bytes"] < 400_000
    assert sum(pdus["statuses"].values()) == 80


def test_the_fuzz_cases_are_reproducible_from_their_seed():
    import random

    seeds = fuzz.load_seeds()
    first = [(c.kind, c.dataset) for _, c in zip(range(30), fuzz.dataset_cases(seeds, random.Random(3)))]
    again = [(c.kind, c.dataset) for _, c in zip(range(30), fuzz.dataset_cases(seeds, random.Random(3)))]
    assert first == again and len({kind for kind, _ in first}) > 4
