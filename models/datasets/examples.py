"""Training and evaluation examples: labelled manifests (CSV of pictures or DICOM series,
`read_manifest`, `load_manifest_examples`) and the node's own archive (`--from-db`).

From the archive, an example is one stored series that the pipeline routed to `route` (state `done`),
labelled by its patient as the archive knows it: ``issuer|Patient ID`` (noisy labels by
design: an ID error in the archive is a wrong label here). Each series is loaded with the
pipeline's loader (`models.inference.loading.load_series`) and normalized with the route's chain at
the model's input geometry (`models.inference.transforms.route_chain`), exactly as the pipeline does
before embedding, then quantized to uint8 and kept in memory: every epoch re-uses them.

A series with several 2D images (both eyes of a fundus study) is one example with several
images; its embedding is the L2-normalized mean of the image embeddings, as in the
pipeline (`Examples.owner` maps images to examples).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.utils.data

from models.inference.loading import read_picture

log = logging.getLogger("models.datasets.examples")


@dataclass
class Examples:
    """Images (M, C, *spatial) uint8, `owner[m]` = example of image m, one label per example."""

    images: np.ndarray
    owner: np.ndarray
    labels: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def single(cls, images: np.ndarray, labels: list[str]) -> Examples:
        return cls(images, np.arange(len(images)), list(labels))

    def image_index(self) -> list[np.ndarray]:
        """Per example, the indices of its images."""
        order = np.argsort(self.owner, kind="stable")
        bounds = np.searchsorted(self.owner[order], np.arange(len(self.labels) + 1))
        return [order[bounds[k]:bounds[k + 1]] for k in range(len(self.labels))]

    def subset(self, indices) -> Examples:
        per = self.image_index()
        parts = [per[i] for i in indices]
        images = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        owner = np.concatenate([np.full(len(p), k) for k, p in enumerate(parts)]) if parts else np.zeros(0, np.int64)
        return Examples(self.images[images], owner, [self.labels[i] for i in indices])

    def concat(self, other: Examples) -> Examples:
        if other.images.shape[1:] != self.images.shape[1:]:
            raise ValueError(f"cannot combine inputs {self.images.shape[1:]} and {other.images.shape[1:]}")
        return Examples(np.concatenate([self.images, other.images]),
                        np.concatenate([self.owner, other.owner + len(self.labels)]), self.labels + other.labels)


def stored_series(route: str, database_url: str, sqlite_synchronous: str = "FULL") -> list[dict]:
    """Processed series of `route`: [{series_pk, label, modality, body_part, paths}], paths relative to storage."""
    from sqlalchemy import select

    from db.engine import make_engine, make_sessionmaker
    from db.models import Instance, Patient, Series, SeriesState, Study
    engine = make_engine(database_url, sqlite_synchronous)
    try:
        with make_sessionmaker(engine)() as session:
            rows = session.execute(
                select(Series.id, Series.modality, Series.body_part, Patient.issuer, Patient.patient_id)
                .join(Study, Series.study_pk == Study.id).join(Patient, Study.patient_pk == Patient.id)
                .where(Series.route == route, Series.state == SeriesState.done).order_by(Series.id)).all()
            paths: dict[int, list[str]] = {}
            for pk, path in session.execute(select(Instance.series_pk, Instance.path)
                                            .join(Series, Instance.series_pk == Series.id)
                                            .where(Series.route == route, Series.state == SeriesState.done)
                                            .order_by(Instance.series_pk, Instance.instance_number,
                                                      Instance.sop_instance_uid)):
                paths.setdefault(pk, []).append(path)
    finally:
        engine.dispose()
    return [{"series_pk": r[0], "modality": r[1], "body_part": r[2], "label": f"{r[3] or ''}|{r[4]}",
             "paths": paths.get(r[0], [])} for r in rows if paths.get(r[0])]


def random_subset(items: list, limit: int | None, seed: int = 0) -> list:
    """At most `limit` of `items` (all when limit is None or not smaller), drawn with a fixed seed, in order."""
    if limit is None or len(items) <= limit:
        return list(items)
    keep = np.sort(np.random.default_rng(seed).choice(len(items), size=limit, replace=False))
    return [items[i] for i in keep]


def patients_up_to(labels: list[str], limit: int) -> list[int]:
    """Indices of the examples of whole patients, drawn in a random order (seed 0) while the total stays
    within `limit` (all when there are no more); sorted."""
    if len(labels) <= limit:
        return list(range(len(labels)))
    by_patient: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_patient.setdefault(label, []).append(i)
    names = sorted(by_patient)
    chosen: list[int] = []
    for k in np.random.default_rng(0).permutation(len(names)):
        members = by_patient[names[k]]
        if len(chosen) + len(members) <= limit:
            chosen += members
    return sorted(chosen)


def load_examples(route: str, database_url: str, storage_dir: Path, geometry: dict | None,
                  sqlite_synchronous: str = "FULL", progress: bool = False,
                  patients: set[str] | None = None, workers: int = 0,
                  max_series: int | None = None) -> tuple[Examples, dict]:
    """The stored series of `route` (optionally only these patient labels; at most `max_series` of them,
    drawn at random with a fixed seed) as normalized uint8 examples; `workers` processes load them (0: this one)."""
    from models.inference.errors import SeriesError
    from models.inference.loading import load_series
    from models.inference.transforms import route_chain
    chain = route_chain(route, geometry)
    series = stored_series(route, database_url, sqlite_synchronous)
    if patients is not None:
        series = [s for s in series if s["label"] in patients]
    available = len(series)
    series = random_subset(series, max_series)

    def normalized(s: dict) -> list[np.ndarray] | str:
        try:
            loaded = load_series([Path(storage_dir) / p for p in s["paths"]], s["modality"], s["body_part"])
            return [_as_uint8(chain(image)) for image in loaded.images]
        except (SeriesError, RuntimeError, ValueError) as error:
            return f"series {s['series_pk']} skipped: {error}"

    images, owner, labels, pks, skipped = [], [], [], [], 0
    for s, arrays in zip(series, _map_in_workers(normalized, series, workers, progress, f"load {route}")):
        if isinstance(arrays, str):
            skipped += 1
            log.warning("%s", arrays)
            continue
        images += arrays
        owner += [len(labels)] * len(arrays)
        labels.append(s["label"])
        pks.append(s["series_pk"])
    if not labels:
        raise ValueError(f"no usable processed series of route {route} in the database")
    info = {"database": redact_url(database_url), "route": route, "series": len(labels), "images": len(images),
            "skipped_series": skipped, "available_series": available, "series_pks": pks,
            "label": "issuer|Patient ID as stored (noisy labels by design)"}
    return Examples(np.stack(images), np.asarray(owner), labels), info


def load_manifest_examples(rows: list[tuple[Path, str]], route: str, geometry: dict | None,
                           progress: bool = False, workers: int = 0) -> Examples:
    """Manifest rows as examples: a PNG/JPEG file is one image (2D routes); a folder of DICOM files or
    a .dcm file is one series, loaded and normalized as the pipeline does; `workers` processes (0: this one)."""
    from models.inference.loading import load_series
    from models.inference.transforms import ROUTE_INPUTS, route_chain
    chain = route_chain(route, geometry)

    def normalized(row: tuple[Path, str]) -> list[np.ndarray]:
        path = Path(row[0])
        if path.is_dir() or path.suffix.lower() == ".dcm":
            files = sorted(path.glob("*.dcm")) if path.is_dir() else [path]
            return [_as_uint8(chain(image)) for image in load_series(files).images]
        return [_as_uint8(chain(read_picture(path, ROUTE_INPUTS[route]["channels"])))]

    images, owner, labels = [], [], []
    for (_, label), arrays in zip(rows, _map_in_workers(normalized, rows, workers, progress, f"load {route}")):
        images += arrays
        owner += [len(labels)] * len(arrays)
        labels.append(label)
    return Examples(np.stack(images), np.asarray(owner), labels)


def _as_uint8(t) -> np.ndarray:
    """A normalized [0, 1] tensor kept as uint8 (a quarter of float32's memory for a whole training set)."""
    t = t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)
    return np.clip(np.rint(t.float().numpy() * 255), 0, 255).astype(np.uint8)


class _Mapped(torch.utils.data.Dataset):
    def __init__(self, function, items) -> None:
        self.function, self.items = function, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.function(self.items[index])


def _as_is(value):
    return value


def _map_in_workers(function, items: list, workers: int, progress: bool, desc: str):
    """function(item) for each item, in order, computed in `workers` processes (torch's DataLoader: it
    starts, feeds and orders the worker processes; each gets one torch thread); 0: in this process."""
    from tqdm import tqdm
    results = (map(function, items) if workers <= 0 else
               torch.utils.data.DataLoader(_Mapped(function, items), batch_size=None, num_workers=workers,
                                           collate_fn=_as_is, prefetch_factor=8))
    return tqdm(results, total=len(items), desc=desc, disable=not progress, leave=False)


def redact_url(url: str) -> str:
    """A database URL without its password (it goes into model cards)."""
    from sqlalchemy.engine import make_url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy parses; keep it as given
        return url


def as_float(batch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(batch).float().div_(255.0)


def pool(vectors: torch.Tensor, owner: torch.Tensor, count: int) -> torch.Tensor:
    """L2-normalized mean of the image embeddings of each example (the pipeline's series embedding)."""
    if len(owner) == count and bool((owner == torch.arange(count, device=owner.device)).all()):
        return vectors
    sums = torch.zeros(count, vectors.shape[1], dtype=vectors.dtype, device=vectors.device)
    sums = sums.index_add(0, owner, vectors)
    return torch.nn.functional.normalize(sums, dim=1)


@torch.inference_mode()
def embed_examples(net: torch.nn.Module, ex: Examples, device: torch.device, batch: int = 64,
                   views: str | None = None) -> np.ndarray:
    """(examples, dim) float32: every image embedded (averaged over the test-time `views`, see
    models.inference.networks.embed_views), pooled per example."""
    from models.inference.networks import embed_views
    net.eval()
    out = []
    for k in range(0, len(ex.images), batch):
        out.append(embed_views(net, as_float(ex.images[k:k + batch]).to(device), views).float().cpu())
    if not out:
        return np.zeros((0, 1), np.float32)
    vectors = torch.cat(out)
    return pool(vectors, torch.as_tensor(ex.owner), len(ex.labels)).numpy()


def pixel_embeddings(ex: Examples, size: int = 32) -> np.ndarray:
    """Baseline: area-downsampled pixels (16^3 for volumes), zero mean, averaged per example."""
    x = as_float(ex.images)
    x = (torch.nn.functional.adaptive_avg_pool2d(x, size) if x.ndim == 4
         else torch.nn.functional.adaptive_avg_pool3d(x, 16)).flatten(1).double()
    x = x - x.mean(dim=1, keepdim=True)
    x = torch.nn.functional.normalize(x, dim=1)
    return pool(x, torch.as_tensor(ex.owner), len(ex.labels)).numpy()


# ---------------------------------------------------------------- manifests (CSV of images or DICOM series)

def read_manifest(path: Path) -> list[tuple[Path, str]]:
    """[(image path, patient_id)], duplicates skipped, paths resolved against the manifest's folder."""
    path = Path(path)
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if (row.get("duplicate_of") or "").strip():
                continue
            if not row.get("image") or not row.get("patient_id"):
                continue
            rows.append((path.parent / row["image"], row["patient_id"].strip()))
    if not rows:
        raise ValueError(f"{path}: no rows with image and patient_id")
    return rows


# ---------------------------------------------------------------- where a set's images came from (cards and reports say)

def manifest_source(manifest: Path) -> str:
    """The card's adaptation.source for images from a manifest (evaluate compares it to say so)."""
    return f"manifest {Path(manifest).resolve()}"


def archive_source(database_url: str, route: str) -> str:
    """The card's adaptation.source for the archive's stored series of `route` (the URL without password)."""
    return f"archive {redact_url(database_url)}: the stored series of route {route}"


ADAPTED_NOTE = "; the model's batch-norm statistics were adapted on these images (no labels read)"


def adaptation_note(card: dict, source: str) -> str:
    """ADAPTED_NOTE when the card was adapted on `source` (manifest_source / archive_source), else ''."""
    return ADAPTED_NOTE if (card.get("adaptation") or {}).get("source") == source else ""
