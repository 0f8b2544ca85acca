"""SeriesPipeline: stored files -> RouteDecision + L2-normalized embedding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from db.records import SeriesWork
from dicom_node.config import PipelineSettings
from models.inference.errors import SeriesError
from models.inference.networks import DEFAULT_SPECS, EmbeddingNet, WeightsError, seeded, sha256_file, spec_dict
from models.inference.pipeline import SeriesPipeline
from tests.helpers import TEST_FILES
from tests.test_models_loading import first, make_cohort

WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "weights"


def work_for(s: dict, pk: int = 1, **changes) -> SeriesWork:
    values = dict(series_pk=pk, series_uid=s["uid"], claim_token="t", attempts=1, modality=s["modality"],
                  body_part=s["body_part"], paths=s["paths"])
    values.update(changes)
    return SeriesWork(**values)


def vector(embedding) -> np.ndarray:
    return np.frombuffer(embedding.vector, dtype="<f4")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> list[dict]:
    return make_cohort(tmp_path_factory.mktemp("cohort"), patients=1, seed=21)


@pytest.fixture(scope="module")
def storage(cohort) -> Path:
    return cohort[0]["root"]


@pytest.fixture(scope="module")
def pipeline() -> SeriesPipeline:
    return SeriesPipeline(PipelineSettings(device="auto"), WEIGHTS)


def test_every_synthetic_series_is_routed_and_embedded(pipeline, cohort, storage):
    for k, s in enumerate(cohort):
        decision, embedding = pipeline.process(work_for(s, k), storage)
        assert (decision.route, decision.source, decision.linkable) == (s["route"], "image+header", True), s["synth"]
        v = vector(embedding)
        assert embedding.route == s["route"] and embedding.dim == v.size == pipeline.models[s["route"]].dim
        assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-5
        # the shipped model of the route, by the version its card gives
        card = json.loads((WEIGHTS / s["route"] / "card.json").read_text())
        assert (embedding.model_name, embedding.model_version) == (card["name"], card["version"])
    assert set(pipeline.profile) == {s["route"] for s in cohort}
    assert all(stats["embed"] > 0 and stats["load"] > 0 for stats in pipeline.profile.values())


def test_embeddings_are_deterministic(pipeline, cohort, storage):
    again = SeriesPipeline(PipelineSettings(), WEIGHTS)          # a second process, same fixed seed
    for route in ("chest_xr", "chest_ct", "fundus"):
        s = next(c for c in cohort if c["route"] == route)
        a = pipeline.process(work_for(s), storage)[1]
        b = pipeline.process(work_for(s), storage)[1]
        c = again.process(work_for(s), storage)[1]
        assert a.vector == b.vector
        assert np.allclose(vector(a), vector(c), atol=1e-6)


def test_different_series_get_different_embeddings(pipeline, cohort, storage):
    a = pipeline.process(work_for(first(cohort, "cxr")), storage)[1]
    other = make_cohort(storage.parent / "other-cohort", patients=1, seed=22)
    b = pipeline.process(work_for(first(other, "cxr")), other[0]["root"])[1]
    assert float(vector(a) @ vector(b)) < 0.99999


def test_process_batch_matches_process_and_isolates_a_broken_series(pipeline, cohort, storage):
    works = [work_for(s, k) for k, s in enumerate(cohort)]
    ct_paths = first(cohort, "ct")["paths"]
    broken = work_for(first(cohort, "ct"), 99, paths=ct_paths[:5] + ct_paths[7:])
    results = pipeline.process_batch(works[:3] + [broken] + works[3:], storage)
    assert isinstance(results[3], SeriesError) and "irregular slice spacing" in results[3].reason
    for work, result in zip(works, results[:3] + results[4:]):
        single = pipeline.process(work, storage)
        assert result[0] == single[0]
        assert np.allclose(vector(result[1]), vector(single[1]), atol=1e-5)


def test_without_router_weights_the_header_decides(tmp_path, cohort, storage):
    pipeline = SeriesPipeline(PipelineSettings(), tmp_path / "no-weights")
    for s in cohort:
        decision, embedding = pipeline.process(work_for(s), storage)
        assert (decision.route, decision.source) == (s["route"], "header")
        assert embedding is not None and embedding.dim == 256


def test_unusable_series_raise_series_error(pipeline, cohort, storage):
    ct = first(cohort, "ct")
    with pytest.raises(SeriesError, match="missing slices"):
        pipeline.process(work_for(ct, paths=ct["paths"][:4] + ct["paths"][5:]), storage)
    with pytest.raises(SeriesError, match="cannot read the file") as info:
        pipeline.process(work_for(ct, paths=["nowhere/0001.dcm"]), storage)
    assert not info.value.permanent


def test_other_is_routed_but_not_embedded(pipeline, tmp_path):
    shutil.copy(TEST_FILES / "examples_palette.dcm", tmp_path / "us.dcm")
    decision, embedding = pipeline.process(SeriesWork(1, "1.2.3", "t", 1, "US", None, ["us.dcm"]), tmp_path)
    assert decision.route == "other" and not decision.linkable and embedding is None


def test_weights_from_the_registry_are_used(tmp_path, cohort, storage):
    folder = tmp_path / "weights" / "chest_xr"
    folder.mkdir(parents=True)
    spec = DEFAULT_SPECS["chest_xr"]
    torch.save(seeded(lambda: EmbeddingNet(spec), 5).state_dict(), folder / "model.pt")
    card = {"name": "chest_xr-test", "version": "test-1", "arch": spec_dict(spec),
            "sha256": sha256_file(folder / "model.pt")}
    (folder / "card.json").write_text(json.dumps(card))
    trained = SeriesPipeline(PipelineSettings(), tmp_path / "weights")
    default = SeriesPipeline(PipelineSettings(), tmp_path / "empty")
    work = work_for(first(cohort, "cxr"))
    a, b = trained.process(work, storage)[1], default.process(work, storage)[1]
    assert (a.model_name, a.model_version) == ("chest_xr-test", "test-1")
    assert b.model_version == "untrained-seed0" and a.vector != b.vector
    (folder / "card.json").unlink()
    with pytest.raises(WeightsError, match="card.json is missing"):
        SeriesPipeline(PipelineSettings(), tmp_path / "weights")


def test_enhancement_setting_changes_the_embedding(pipeline, cohort, storage):
    enhanced = SeriesPipeline(PipelineSettings(enhance={"chest_xr": ["clahe", "edges"]}), WEIGHTS)
    work = work_for(first(cohort, "cxr"))
    assert enhanced.process(work, storage)[1].vector != pipeline.process(work, storage)[1].vector


def _refill(storage: Path, paths: list[str], out: Path, fill) -> list[str]:
    """Copies of a stored series' files with other pixels (fill(k, rows, columns) -> uint16)."""
    import pydicom
    names = []
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(storage / path)
        pixels = fill(k, int(ds.Rows), int(ds.Columns))
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PhotometricInterpretation, ds.SamplesPerPixel = "MONOCHROME2", 1
        for keyword in ("WindowCenter", "WindowWidth", "VOILUTSequence"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.PixelData = pixels.tobytes()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        out.mkdir(parents=True, exist_ok=True)
        ds.save_as(out / f"{k:04d}.dcm", enforce_file_format=True)
        names.append(f"{out.name}/{k:04d}.dcm")
    return names


@pytest.mark.parametrize("route", ["chest_xr", "chest_ct"])
def test_series_that_are_not_anatomy_are_stored_but_not_embedded(pipeline, cohort, storage, tmp_path, route):
    """Random-noise QA images, blank frames and a bar pattern under the header of a real series:
    stored and listed, never embedded (no identity evidence), whether the router already calls
    them "other" or routes them (then the anatomy gate stops them); the real series pass."""
    rng = np.random.default_rng(0)
    fills = {"noise": lambda k, r, c: rng.integers(0, 4096, (r, c), dtype=np.uint16),
             "blank": lambda k, r, c: np.full((r, c), 1000, np.uint16),
             "pattern": lambda k, r, c: np.repeat(np.linspace(0, 4000, 8).astype(np.uint16), -(-c // 8))[None, :c]
             .repeat(r, 0)}
    source = next(c for c in cohort if c["route"] == route)
    gated = set()
    for name, fill in fills.items():
        paths = _refill(storage, source["paths"], tmp_path / name, fill)
        decision, embedding = pipeline.process(work_for(source, paths=paths), tmp_path)
        assert embedding is None and not decision.linkable, (name, decision)
        if any(f.startswith(f"not anatomy: {name}") for f in decision.findings):
            gated.add(name)
        else:
            assert decision.route == "other", decision.findings
    if route == "chest_ct":       # the reported case: the router takes CT noise for anatomy, the gate does not
        assert "noise" in gated
    assert pipeline.process(work_for(source), storage)[1] is not None


def test_the_anatomy_gate_on_its_own():
    from models.inference.anatomy_gate import series_problem
    rng = np.random.default_rng(1)
    smooth = np.cumsum(np.cumsum(rng.normal(size=(1, 256, 256)), 1), 2).astype(np.float32)   # structured
    assert series_problem("gray", [smooth]) is None
    assert series_problem("gray", [rng.random((1, 256, 256), dtype=np.float32)]).startswith("noise")
    assert series_problem("volume", [rng.normal(0, 300, (1, 64, 64, 20)).astype(np.float32)]).startswith("noise")
    assert series_problem("rgb", [np.zeros((3, 64, 64), np.float32)]).startswith("blank")
    # most planes decide: one blank frame in a cine of real-looking ones does not
    assert series_problem("gray", [smooth, smooth, np.zeros((1, 256, 256), np.float32)]) is None
