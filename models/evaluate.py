"""Score an identity model on labelled images (a manifest) or on the embeddings stored in the DB.

    dicom-node evaluate --route chest_xr --manifest ../shared/data/cxr-adult-figures/manifest.csv --out report/
    dicom-node evaluate --route chest_xr --from-db --out report/

Manifest: the CSV format of ../shared/data (columns `image`, `patient_id`, optional
`duplicate_of`; image paths relative to the manifest). Rows with a non-empty `duplicate_of`
(byte-identical copies) are skipped. Images (PNG/JPEG) are read as gray (or RGB for the
colour routes) in [0, 1] and normalized by the route's chain of models.transforms at the
model's input size (card "input.size", default the route's 224), i.e. what the pipeline does
for 2D DICOM images. When the manifest is the one the model was trained on, the patients of
the card's `validation_patients` are the only ones scored (never the training patients).

DB: the stored embeddings of `--route` made by the current registry model (name + version;
falling back to the most common version, said in the report), labelled by issuer + Patient ID.

Output folder: metrics.json (model, baseline "pixel-cosine" = cosine of 32 x 32 area-downsampled,
zero-mean pixels of the same normalized input; manifest only), roc.png, cmc.png, scores.png.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from models import metrics as M

log = logging.getLogger("models.evaluate")
BASELINE_SIZE = 32


# ---------------------------------------------------------------- manifest data (shared with training)

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


def input_transform(route: str, size: int):
    """The route's 2D normalization chain (models.transforms) at `size` pixels."""
    from monai.transforms import Compose, Resize, ResizeWithPadOrCrop

    from models.transforms import ROUTE_INPUTS, PercentileScale, ToChannels
    info = ROUTE_INPUTS[route]
    if len(info.get("shape") or ()) != 2:
        raise ValueError(f"route {route}: manifests of 2D images only serve the 2D routes")
    steps = [ToChannels(info["channels"]), Resize(spatial_size=size, size_mode="longest", mode="area")]
    if route == "chest_xr":
        steps.append(PercentileScale(0.5, 99.5))
    steps.append(ResizeWithPadOrCrop((size, size)))
    return Compose(steps)


def load_images(paths: list[Path], route: str, size: int, progress: bool = False) -> np.ndarray:
    """(N, C, size, size) uint8 (quantized to save memory; x / 255 is the network input)."""
    from PIL import Image
    from tqdm import tqdm

    from models.transforms import ROUTE_INPUTS
    channels = ROUTE_INPUTS[route]["channels"]
    chain = input_transform(route, size)
    out = np.empty((len(paths), channels, size, size), dtype=np.uint8)
    for k, p in enumerate(tqdm(paths, desc="load", disable=not progress, leave=False)):
        with Image.open(p) as im:
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        x = chain(torch.from_numpy(np.ascontiguousarray(arr)))
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        out[k] = np.clip(np.rint(x.numpy() * 255), 0, 255).astype(np.uint8)
    return out


def as_float(batch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(batch).float().div_(255.0)


@torch.inference_mode()
def embed_images(net: torch.nn.Module, images: np.ndarray, device: torch.device, batch: int = 64) -> np.ndarray:
    net.eval()
    out = [net(as_float(images[k:k + batch]).to(device)).float().cpu().numpy() for k in range(0, len(images), batch)]
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def pixel_embeddings(images: np.ndarray, size: int = BASELINE_SIZE) -> np.ndarray:
    """Baseline: area-downsampled pixels, zero mean per image (cosine = correlation)."""
    x = torch.nn.functional.adaptive_avg_pool2d(as_float(images), size).flatten(1).numpy().astype(np.float64)
    return x - x.mean(axis=1, keepdims=True)


def model_input_size(card: dict, route: str) -> int:
    from models.transforms import ROUTE_INPUTS
    return int((card.get("input") or {}).get("size") or ROUTE_INPUTS[route]["shape"][0])


# ---------------------------------------------------------------- evaluation

def evaluate_manifest(route: str, manifest: Path, weights_dir: Path | None, device: torch.device,
                      all_patients: bool = False, progress: bool = False) -> dict:
    from models.networks import load_identity_model
    model = load_identity_model(route, weights_dir, device)
    rows = read_manifest(manifest)
    note = "all patients of the manifest"
    trained_on = (model.card.get("training_data") or {}).get("manifest")
    if trained_on and not all_patients and Path(trained_on).resolve() == Path(manifest).resolve():
        keep = set(model.card.get("validation_patients") or [])
        rows = [r for r in rows if r[1] in keep]
        note = f"only the {len(keep)} validation patients of the card (the model was trained on this manifest)"
        if not rows:
            raise ValueError("the model was trained on this manifest and its card lists no validation patients")
    size = model_input_size(model.card, route)
    images = load_images([r[0] for r in rows], route, size, progress)
    labels = [r[1] for r in rows]
    emb = embed_images(model.net, images, device)
    return {"route": route, "source": {"manifest": str(manifest), "selection": note, "input_size": size},
            "model": {"name": model.name, "version": model.version},
            "results": {"model": M.identity_metrics(emb, labels, curves=True),
                        "pixel-cosine": M.identity_metrics(pixel_embeddings(images), labels, with_pml=False,
                                                           curves=True)},
            "calibration": model.card.get("calibration")}


def db_embeddings(route: str, database_url: str, sqlite_synchronous: str = "FULL",
                  model_name: str | None = None, model_version: str | None = None):
    """(vectors (N, dim), labels issuer|patient_id, version used, note) from the stored embeddings."""
    from sqlalchemy import select

    from db.engine import make_engine, make_sessionmaker
    from db.models import Embedding, Patient, Series, Study
    engine = make_engine(database_url, sqlite_synchronous)
    with make_sessionmaker(engine)() as session:
        q = (select(Embedding.vector, Embedding.model_name, Embedding.model_version, Patient.issuer, Patient.patient_id)
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
    return vectors, labels, {"name": used[0], "version": used[1]}, note


def evaluate_db(route: str, database_url: str, weights_dir: Path | None, sqlite_synchronous: str = "FULL") -> dict:
    from models.networks import load_identity_model
    model = load_identity_model(route, weights_dir, torch.device("cpu"))
    vectors, labels, used, note = db_embeddings(route, database_url, sqlite_synchronous, model.name, model.version)
    return {"route": route, "source": {"database": "stored embeddings", "selection": note},
            "model": used, "results": {"model": M.identity_metrics(vectors, labels, curves=True)},
            "calibration": model.card.get("calibration") if used == {"name": model.name, "version": model.version}
            else None}


# ---------------------------------------------------------------- report

def _plots(results: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, r in results.items():
        c = r["_curves"]
        ax.plot(np.maximum(c["far"], 1e-6), c["tar"], label=f"{name} (AUC {r['roc_auc']:.3f})")
    ax.set_xscale("log"), ax.set_xlim(1e-5, 1), ax.set_xlabel("FAR (different-patient pairs accepted)")
    ax.set_ylabel("TAR (same-patient pairs accepted)"), ax.set_title("ROC"), ax.legend(fontsize=8), ax.grid(alpha=.3)
    fig.tight_layout(), fig.savefig(out / "roc.png", dpi=100), plt.close(fig)
    files.append("roc.png")

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, r in results.items():
        ax.plot(np.arange(1, len(r["cmc"]) + 1), r["cmc"], marker=".", label=f"{name} (Rank-1 {r['rank1']:.3f})")
    ax.set_xlabel("rank"), ax.set_ylabel("identification rate"), ax.set_ylim(0, 1.02)
    ax.set_title(f"CMC (gallery {next(iter(results.values()))['gallery_size']} images)"), ax.legend(fontsize=8)
    ax.grid(alpha=.3), fig.tight_layout(), fig.savefig(out / "cmc.png", dpi=100), plt.close(fig)
    files.append("cmc.png")

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        c = r["_curves"]
        bins = np.linspace(min(c["impostor"].min(), c["genuine"].min()), 1, 60)
        ax.hist(c["impostor"], bins=bins, density=True, alpha=.6, label="different patient")
        ax.hist(c["genuine"], bins=bins, density=True, alpha=.6, label="same patient")
        ax.set_title(name), ax.set_xlabel("cosine similarity"), ax.legend(fontsize=8)
    fig.tight_layout(), fig.savefig(out / "scores.png", dpi=100), plt.close(fig)
    files.append("scores.png")
    return files


def write_report(report: dict, out: Path | None, json_path: Path | None = None) -> dict:
    """metrics.json (+ PNG plots when `out` is given); returns the JSON-able report."""
    results = report["results"]
    clean = {k: v for k, v in report.items() if k != "results"}
    clean["results"] = {name: {k: v for k, v in r.items() if k != "_curves"} for name, r in results.items()}
    cal = report.get("calibration")
    if cal:
        from models.calibration import Calibration, reliability
        c = Calibration.from_json(cal)
        g, i = results["model"]["_curves"]["genuine"], results["model"]["_curves"]["impostor"]
        if len(g) and len(i):
            clean["calibration_check"] = reliability(c, g, i, bins=5)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        clean["plots"] = _plots(results, out)
        (out / "metrics.json").write_text(json.dumps(clean, indent=2, default=float) + "\n", encoding="utf-8")
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(clean, indent=2, default=float) + "\n", encoding="utf-8")
    return clean


def format_summary(report: dict) -> str:
    lines = [f"route {report['route']}  model {report['model']['name']} {report['model']['version']}",
             f"source {report['source']}"]
    for name, r in report["results"].items():
        lines.append(f"{name:>13}: Rank-1 {r['rank1']:.3f}  Rank-5 {r['rank5']:.3f}  mAP {r['mAP']:.3f}  "
                     f"AUC {r['roc_auc']:.3f}  EER {r['eer']:.3f}  TAR@FAR1e-3 {r['tar_at_far_1e-3']:.3f}  "
                     f"(images {r['images']}, patients {r['patients']}, queries {r['queries']}, "
                     f"gallery {r['gallery_size']})")
    return "\n".join(lines)
