"""Score an identity model on labelled images (a manifest) or on the embeddings stored in the DB.

    dicom-node evaluate --route chest_xr --manifest ../shared/data/cxr-adult-figures/manifest.csv --out report/
    dicom-node evaluate --route chest_xr --from-db --out report/

Manifest: the CSV format of ../shared/data (columns `image`, `patient_id`, optional
`duplicate_of`; image paths relative to the manifest). `image` may also be a DICOM series
(a folder of .dcm files, e.g. from `python -m models.datasets.synth_manifest`), loaded with the
pipeline's loader: that is how the volume routes are scored and trained from manifests.
Rows with a non-empty `duplicate_of` (byte-identical copies) are skipped. Images (PNG/JPEG)
are read as gray (or RGB for the colour routes) in [0, 1] and normalized by the route's chain
of models.inference.transforms at the model's input geometry (card "input", default the route's), i.e.
what the pipeline does for DICOM images. When the manifest is one the model was trained on,
the patients of the card's `validation_patients` are the only ones scored (never the
training patients).

DB (`evaluate_db`): the stored embeddings of `--route` made by the current registry model;
when there are none (or with `--recompute`) the archive's processed series are embedded now
with the current model (models.datasets.examples); labels issuer|Patient ID. When the card says the
model was trained on this archive, only its validation patients are scored.
`--update-card NAME` records the model's metrics in the card (metrics.heldout.NAME) and
refits the card's calibration on these pairs.

Geometric verification: when the card has a "verification" entry (models.inference.verification), a
manifest's pairs are scored cosine + bonus over every pair of examples ("model"; 10-25 ms per
pair on one core, pairs spread over all cores, so minutes for a few hundred images), next to the cosine alone
("embedding only"); that is the score the card's calibration is of. From the database the same,
with each series' images read from the storage folder through the pipeline's loader (at most
`max_checked_series` series, whole patients drawn at random with a fixed seed, since the pairs
grow with the square); without a storage folder only cosines are scored, and the report says so.
`--choose-check-weights` first picks the check's two weights on the scored pairs (best mAP over
CHECK_WEIGHT_GRID; `--update-card` writes them into the card, and the recorded metrics say they
were chosen on these pairs).

Output folder: metrics.json (model, baseline "pixel-cosine" = cosine of 32 x 32 area-downsampled,
zero-mean pixels of the same normalized input, 16^3 for volumes; for 2D routes baseline "frozen-lite0" =
ImageNet EfficientNet-Lite0 features, models.evaluation.frozen_baseline), roc.png, cmc.png, scores.png.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from models.datasets.examples import read_manifest
from models.evaluation import metrics as M

log = logging.getLogger("models.evaluation.evaluate")

VERIFIED_SCORE = "cosine + verification bonus (models.inference.verification)"


# ---------------------------------------------------------------- evaluation

def trained_on_manifest(card: dict, manifest: Path) -> bool:
    data = card.get("training_data") or {}
    used = data.get("manifests") or ([data["manifest"]] if data.get("manifest") else [])
    return any(Path(m).resolve() == Path(manifest).resolve() for m in used)


def scored_rows(card: dict, manifest: Path, all_patients: bool = False) -> tuple[list[tuple[Path, str]], str]:
    """The manifest rows to score and why: only the card's validation patients when the model was trained on it."""
    rows = read_manifest(manifest)
    if all_patients or not trained_on_manifest(card, manifest):
        from models.datasets.examples import adaptation_note, manifest_source
        return rows, "all patients of the manifest" + adaptation_note(card, manifest_source(manifest))
    keep = set(card.get("validation_patients") or [])
    rows = [r for r in rows if r[1] in keep]
    if not rows:
        raise ValueError("the model was trained on this manifest and its card lists no validation patients")
    return rows, f"only the {len(keep)} validation patients of the card (the model was trained on this manifest)"


def manifest_embeddings(route: str, manifest: Path, weights_dir: Path | None, device: torch.device,
                        all_patients: bool = False, progress: bool = False):
    """The route's model, the manifest's examples (scored_rows) at the card's input geometry, their embeddings,
    the selection note and the geometry."""
    from models.datasets.examples import embed_examples, load_manifest_examples
    from models.inference.networks import load_identity_model
    from models.inference.transforms import route_geometry
    model = load_identity_model(route, weights_dir, device)
    rows, note = scored_rows(model.card, manifest, all_patients)
    geometry = route_geometry(route, model.card.get("input"))
    ex = load_manifest_examples(rows, route, geometry, progress)
    return model, ex, embed_examples(model.net, ex, device, views=model.views), note, geometry


def evaluate_manifest(route: str, manifest: Path, weights_dir: Path | None, device: torch.device,
                      all_patients: bool = False, progress: bool = False, choose_check_weights: bool = False,
                      baseline_backbone: str | None = None) -> dict:
    """Score a manifest: 2D image files, or DICOM series (a folder or a .dcm file per row, loaded with the
    pipeline's loader, so the volume routes can be scored too), at the card's input geometry."""
    from models.datasets.examples import pixel_embeddings
    from models.evaluation.check_sets import manifest_features
    from models.evaluation.frozen_baseline import frozen_metrics, frozen_vectors
    from models.inference.verification import VerificationSettings
    model, ex, emb, note, geometry = manifest_embeddings(route, manifest, weights_dir, device, all_patients, progress)
    verification = VerificationSettings.from_card(model.card)
    source = {"manifest": str(manifest), "selection": note, "input": geometry,
              **({"test_time_views": model.views} if model.views else {}),
              **({"input_size": geometry["size"]} if "size" in geometry else {})}
    report = {"route": route, "source": source, "model": {"name": model.name, "version": model.version},
              "calibration": model.card.get("calibration")}
    if verification:
        # the card's calibration is of cosine + bonus: "model" is that score, the embedding alone is kept beside it
        rows, _ = scored_rows(model.card, manifest, all_patients)
        results = checked_results(emb, ex.labels, manifest_features(rows, route, verification), verification,
                                  report, choose_check_weights, progress)
    else:
        results = {"model": M.identity_metrics(emb, ex.labels, curves=True)}
    results["pixel-cosine"] = M.identity_metrics(pixel_embeddings(ex), ex.labels, with_pml=False, curves=True)
    results.update(frozen_metrics(frozen_vectors(ex, route, baseline_backbone, source), ex.labels))
    return {**report, "results": results}


# the check's weights tried by `evaluate --choose-check-weights`
CHECK_WEIGHT_GRID = {"weight_inliers": (0.0, 0.05, 0.1, 0.2), "weight_ncc": (0.0, 0.1, 0.3, 0.5, 1.0, 1.5)}


def checked_results(vectors: np.ndarray, labels: list[str], features: list, s, report: dict,
                    choose: bool = False, progress: bool = False) -> dict:
    """Metrics of cosine + check ("model") and of the cosine alone ("embedding only"); the settings used go
    into report["source"]["verification"]. With `choose`, the check's weights are first chosen on these
    pairs: the best mAP over CHECK_WEIGHT_GRID (ties: the card's own, then the earlier), kept in
    report["check_weights"] for `update_card` to write into the card."""
    from dataclasses import replace as with_weights

    from models.inference.verification import bonus_from_matches, pairwise_matches
    matches = pairwise_matches(features, s, progress=progress)
    cosine = M.similarity(vectors)
    if choose:
        grid = []
        for wi in CHECK_WEIGHT_GRID["weight_inliers"]:
            for wn in CHECK_WEIGHT_GRID["weight_ncc"]:
                r = M.identity_metrics(vectors, labels, sim=cosine + bonus_from_matches(matches, wi, wn))
                grid.append({"weight_inliers": wi, "weight_ncc": wn, **{k: r[k] for k in ("rank1", "mAP", "roc_auc")}})
        card_weights = (s.weight_inliers, s.weight_ncc)
        best = max(grid, key=lambda r: (round(r["mAP"], 12), (r["weight_inliers"], r["weight_ncc"]) == card_weights))
        report["check_weights"] = {"card": dict(zip(("weight_inliers", "weight_ncc"), card_weights)),
                                   "chosen": {k: best[k] for k in ("weight_inliers", "weight_ncc")}, "grid": grid}
        s = with_weights(s, weight_inliers=best["weight_inliers"], weight_ncc=best["weight_ncc"])
    report["source"]["verification"] = s.to_json()
    sim = cosine + bonus_from_matches(matches, s.weight_inliers, s.weight_ncc)
    return {"model": M.identity_metrics(vectors, labels, curves=True, sim=sim),
            "embedding only": M.identity_metrics(vectors, labels, curves=True)}


def db_embeddings(route: str, database_url: str, sqlite_synchronous: str = "FULL",
                  model_name: str | None = None, model_version: str | None = None):
    """(vectors (N, dim), labels issuer|patient_id, version used, note, series pks) from the stored embeddings."""
    from sqlalchemy import select

    from db.engine import make_engine, make_sessionmaker
    from db.models import Embedding, Patient, Series, Study
    engine = make_engine(database_url, sqlite_synchronous)
    with make_sessionmaker(engine)() as session:
        q = (select(Embedding.vector, Embedding.model_name, Embedding.model_version, Patient.issuer, Patient.patient_id,
                    Embedding.series_pk)
             .join(Series, Embedding.series_pk == Series.id).join(Study, Series.study_pk == Study.id)
             .join(Patient, Study.patient_pk == Patient.id).where(Embedding.route == route))
        rows = session.execute(q).all()
    engine.dispose()
    if not rows:
        raise ValueError(f"no stored embeddings for route {route}")
    versions = Counter((r[1], r[2]) for r in rows)
    wanted = (model_name, model_version)
    if wanted in versions:
        used, note = wanted, "embeddings of the current registry model"
    else:
        used = versions.most_common(1)[0][0]
        note = f"no stored embeddings of the current model {wanted}; scored the most common version"
    rows = [r for r in rows if (r[1], r[2]) == used]
    vectors = np.stack([np.frombuffer(r[0], dtype="<f4") for r in rows])
    labels = [f"{r[3] or ''}|{r[4]}" for r in rows]
    return vectors, labels, {"name": used[0], "version": used[1]}, note, [int(r[5]) for r in rows]


def evaluate_db(route: str, database_url: str, weights_dir: Path | None, sqlite_synchronous: str = "FULL",
                storage_dir: Path | None = None, all_patients: bool = False, recompute: bool = False,
                progress: bool = False, max_checked_series: int = 600, choose_check_weights: bool = False,
                baseline_backbone: str | None = None) -> dict:
    """Score the archive's series of `route`, labelled by issuer|Patient ID.

    Stored embeddings of the current registry model are used when present (else, without a
    storage folder, the most common stored version). With `storage_dir`, when the current model
    made no stored embeddings or `recompute` is set, the processed series are loaded and embedded
    with the current model (models.datasets.examples, the pipeline's loader and the card's input geometry),
    and the pixel-cosine baseline is scored too. When the model was trained on this database
    (card training_data.database), only the card's validation patients are scored.
    """
    from models.datasets.examples import (adaptation_note, archive_source, embed_examples, load_examples,
                                          patients_up_to, pixel_embeddings, redact_url)
    from models.evaluation.check_sets import archive_features
    from models.evaluation.frozen_baseline import frozen_metrics, frozen_vectors, stored_note
    from models.inference.networks import load_identity_model
    from models.inference.verification import VerificationSettings
    model = load_identity_model(route, weights_dir, torch.device("cpu"))
    keep, selection = None, "all patients of the archive"
    trained_on = (model.card.get("training_data") or {}).get("database")
    if trained_on and not all_patients and trained_on == redact_url(database_url):
        keep = set(model.card.get("validation_patients") or [])
        selection = f"only the {len(keep)} validation patients of the card (the model was trained on this archive)"
    selection += adaptation_note(model.card, archive_source(database_url, route))
    stored = None
    if not recompute:
        try:
            stored = db_embeddings(route, database_url, sqlite_synchronous, model.name, model.version)
        except ValueError:
            stored = None
        if stored and storage_dir is not None and stored[2] != {"name": model.name, "version": model.version}:
            stored = None
    results, frozen = {}, None
    if stored:
        vectors, labels, used, note, series_pks = stored
        if keep is not None:
            mask = np.array([lab in keep for lab in labels])
            vectors, labels = vectors[mask], [lab for lab, m in zip(labels, mask) if m]
            series_pks = [pk for pk, m in zip(series_pks, mask) if m]
        source = {"database": "stored embeddings", "selection": f"{note}; {selection}",
                  "frozen_baseline": stored_note(route, baseline_backbone)}
    else:
        if storage_dir is None:
            raise ValueError(f"no stored embeddings for route {route}")
        from models.inference.transforms import route_geometry
        geometry = route_geometry(route, model.card.get("input"))
        ex, info = load_examples(route, database_url, storage_dir, geometry, sqlite_synchronous, progress, keep)
        vectors, labels, used = embed_examples(model.net, ex, torch.device("cpu"), views=model.views), ex.labels, \
            {"name": model.name, "version": model.version}
        series_pks = info["series_pks"]
        pixels = pixel_embeddings(ex)
        source = {"database": "series embedded now with the current model", "selection": selection,
                  "input": geometry, "series": info["series"], "skipped_series": info["skipped_series"]}
        frozen = frozen_vectors(ex, route, baseline_backbone, source)
    current = used == {"name": model.name, "version": model.version}
    calibration = model.card.get("calibration") if current else None
    verification = VerificationSettings.from_card(model.card)
    checked = {"source": source}                 # checked_results records its settings (and a weight choice) here
    if verification and current and storage_dir is not None:
        # the card's calibration is of cosine + bonus: the pairs are checked on the series' stored images
        chosen = patients_up_to(labels, max_checked_series)
        if len(chosen) < len(labels):
            source["selection"] += (f"; {len(chosen)} of {len(labels)} series checked: whole patients drawn at "
                                    f"random (seed 0), up to --max-checked-series {max_checked_series}")
        vectors, labels, series_pks = vectors[chosen], [labels[i] for i in chosen], [series_pks[i] for i in chosen]
        features = archive_features(route, database_url, storage_dir, series_pks, verification, sqlite_synchronous)
        results.update(checked_results(vectors, labels, features, verification, checked, choose_check_weights, progress))
        if not stored:
            pixels = pixels[chosen]
            frozen = frozen and (frozen[0], frozen[1][chosen])
    else:
        results["model"] = M.identity_metrics(vectors, labels, curves=True)
        if verification:
            # the card's calibration is of cosine + bonus, which needs the series' images: not at hand here
            source["verification"] = "not applied: these scores are cosines of the stored embeddings alone"
            calibration = None
    if not stored:
        results["pixel-cosine"] = M.identity_metrics(pixels, labels, with_pml=False, curves=True)
    results.update(frozen_metrics(frozen, labels))
    return {**checked, "route": route, "source": source, "model": used, "results": results, "calibration": calibration}
