"""Geometric-check features (models.inference.verification) of every example of a labelled set: the
images of a manifest's rows or of the archive's stored series, for scoring all pairs in `evaluate`."""

from __future__ import annotations

import logging
from pathlib import Path

from models.datasets.examples import stored_series
from models.inference.loading import load_series, read_picture
from models.inference.transforms import ROUTE_INPUTS
from models.inference.verification import ImageFeatures, VerificationSettings, prepare

log = logging.getLogger("models.evaluation.check_sets")


def manifest_features(rows: list[tuple[Path, str]], route: str, s: VerificationSettings) -> list[list[ImageFeatures]]:
    """Features of each manifest row's images: a PNG/JPEG file, or a DICOM series (folder or .dcm) loaded
    with the pipeline's loader, in the same [0, 1] range the pipeline normalizes from."""
    out = []
    for path, _ in rows:
        path = Path(path)
        if path.is_dir() or path.suffix.lower() == ".dcm":
            files = sorted(path.glob("*.dcm")) if path.is_dir() else [path]
            images = load_series(files).images[:s.max_images]
        else:
            images = [read_picture(path, ROUTE_INPUTS[route]["channels"])]
        out.append([prepare(image, s) for image in images])
    return out


def archive_features(route: str, database_url: str, storage_dir: Path, series_pks: list[int], s: VerificationSettings,
                     sqlite_synchronous: str = "FULL") -> list[list[ImageFeatures]]:
    """Verification features of stored series (their first images, through the pipeline's loader), in
    `series_pks` order; a series that cannot be read gets none (its pairs: no bonus), with a warning."""
    found = {x["series_pk"]: x for x in stored_series(route, database_url, sqlite_synchronous)}
    out = []
    for pk in series_pks:
        x = found.get(pk)
        try:
            images = load_series([Path(storage_dir) / p for p in x["paths"]], x["modality"], x["body_part"]).images
            out.append([prepare(image, s) for image in images[:s.max_images]])
        except Exception as error:  # noqa: BLE001 - one unreadable series must not end the evaluation
            log.warning("series pk %s: images not readable for the check (%s: %s)", pk, type(error).__name__, error)
            out.append([])
    return out
