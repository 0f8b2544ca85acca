"""What `dicom-node privacy-audit` reads: the export (a folder of DICOM, or images with a manifest),
the de-identification key, and the node's stored embeddings. Plain data out (`ExportSeries`).

A DICOM export is embedded as the node embeds what it receives (models.inference.pipeline: load,
route, normalize, embed; one series = one embedding, its pseudonym the Patient ID it carries),
so its vectors compare with the stored ones. A manifest (columns image, pseudonym as patient_id)
is embedded as `dicom-node evaluate --manifest` embeds it (models.evaluation.evaluate), one row
= one series, for the one route given.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from linkage.privacy_headers import HeaderTally

ModelKey = tuple[str, str, str]


class AuditInputError(ValueError):
    """Bad input: the command says what and exits 2."""


@dataclass
class ExportSeries:
    label: str                      # export-local name (E0001...), what the report shows besides the pseudonym
    pseudonym: str
    study: str                      # the export's Study Instance UID (or the manifest row): never shown
    model_key: ModelKey
    vector: np.ndarray              # float32, L2-normalized
    paths: list[str] = field(default_factory=list)


@dataclass
class ExportSet:
    series: list[ExportSeries]
    headers: HeaderTally | None     # None for a manifest (no DICOM header to check)
    skipped: dict[str, int]         # why a series gave no embedding -> how many
    kind: str                       # "dicom" | "manifest"
    unembedded: list[ExportSeries] = field(default_factory=list)    # those series (no vector), for the OCR

    def images(self) -> list[ExportSeries]:
        """Every series with pixels to look at: the embedded ones, then the others."""
        return self.series + self.unembedded


def read_key(path: Path) -> dict[str, str]:
    """pseudonym -> original Patient ID from a CSV with columns `pseudonym` and `patient_id`."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            if "pseudonym" not in columns or "patient_id" not in columns:
                raise AuditInputError(f"--key {path}: needs columns pseudonym and patient_id (has: "
                                      f"{', '.join(columns) or 'no header'})")
            key = {}
            for row in reader:
                row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
                if row["pseudonym"] and row["patient_id"]:
                    key[row["pseudonym"]] = row["patient_id"]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise AuditInputError(f"--key {path}: cannot read it ({error})") from error
    if not key:
        raise AuditInputError(f"--key {path}: no rows with a pseudonym and a patient_id")
    return key


def dicom_series(folder: Path) -> tuple[dict[str, dict], HeaderTally]:
    """Series UID -> {pseudonym, study, modality, body_part, paths (by Instance Number)}, and the header
    tally of every DICOM file under `folder` (other files are left alone)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    groups: dict[str, dict] = {}
    numbered: dict[str, list] = defaultdict(list)
    tally = HeaderTally()
    for root, dirs, files in os.walk(Path(folder).resolve()):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError):
                continue
            pseudonym = str(ds.get("PatientID", "") or "")
            tally.add(ds, pseudonym)
            uid = str(ds.get("SeriesInstanceUID", "") or path.parent)
            groups.setdefault(uid, {"pseudonym": pseudonym, "study": str(ds.get("StudyInstanceUID", "")),
                                    "modality": ds.get("Modality"), "body_part": ds.get("BodyPartExamined")})
            number = ds.get("InstanceNumber")
            numbered[uid].append((int(number) if str(number or "").strip().lstrip("-").isdigit() else 0, str(path)))
    for uid, items in numbered.items():
        groups[uid]["paths"] = [p for _, p in sorted(items)]
    return groups, tally


def embed_dicom(folder: Path, settings, weights_dir: Path) -> ExportSet:
    """Every series of a DICOM folder through the node's pipeline (route, then the route's model)."""
    from db.records import SeriesWork
    from models.inference.errors import SeriesError
    from models.inference.pipeline import SeriesPipeline
    groups, tally = dicom_series(folder)
    if not groups:
        raise AuditInputError(f"{folder}: no DICOM image files found")
    pipeline = SeriesPipeline(settings, weights_dir)
    uids = list(groups)
    out, skipped, unembedded = [], defaultdict(int), []
    for k in range(0, len(uids), settings.batch_size):
        chunk = uids[k:k + settings.batch_size]
        works = [SeriesWork(i, "", "", 0, groups[u]["modality"], groups[u]["body_part"], groups[u]["paths"])
                 for i, u in enumerate(chunk)]
        for uid, result in zip(chunk, pipeline.process_batch(works, Path("/"))):
            g = groups[uid]
            if isinstance(result, SeriesError):
                skipped["not readable as an image series"] += 1
                continue
            decision, embedding = result
            if embedding is None:
                skipped[f"routed to {decision.route}: no identity model links it"
                        if decision.linkable else "not linkable (low route confidence or not anatomy)"] += 1
                unembedded.append(ExportSeries("", g["pseudonym"], g["study"], (decision.route, "", ""),
                                               np.empty(0, np.float32), g["paths"]))
                continue
            vector = np.frombuffer(embedding.vector, dtype="<f4").astype(np.float32)
            out.append(ExportSeries("", g["pseudonym"], g["study"],
                                    (embedding.route, embedding.model_name, embedding.model_version), vector, g["paths"]))
    numbered = _numbered(out + unembedded)
    return ExportSet(numbered[:len(out)], tally, dict(skipped), "dicom", numbered[len(out):])


def embed_manifest(manifest: Path, route: str, weights_dir: Path, device) -> ExportSet:
    """A manifest as `evaluate` reads it (models.evaluation.evaluate.manifest_embeddings), all rows."""
    from models.datasets.examples import read_manifest
    from models.evaluation.evaluate import manifest_embeddings
    try:
        rows = read_manifest(manifest)
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as error:
        raise AuditInputError(f"{manifest}: not a manifest with columns image and patient_id ({error})") from error
    missing = [str(p) for p, _ in rows if not Path(p).exists()]
    if missing:
        raise AuditInputError(f"{manifest}: {len(missing)} image(s) not found, e.g. {missing[0]}")
    model, ex, vectors, _note, _geometry = manifest_embeddings(route, manifest, weights_dir, device, all_patients=True)
    key = (route, model.name, model.version)
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    out = [ExportSeries("", label, f"row {i}", key, unit[i].astype(np.float32), [str(rows[i][0])])
           for i, label in enumerate(ex.labels)]
    return ExportSet(_numbered(out), None, {}, "manifest")


def _numbered(series: list[ExportSeries]) -> list[ExportSeries]:
    for i, s in enumerate(series, 1):
        s.label = f"E{i:04d}"
    return series


def store_gallery(store, model_key: ModelKey) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """The stored embeddings of one model (route, name, version) and each one's (issuer, Patient ID)."""
    embeddings = [e for e in store.embeddings() if e.model_key == tuple(model_key)]
    if not embeddings:
        return np.empty((0, 0), np.float32), []
    facts = store.study_facts(study_pks={e.study_pk for e in embeddings})
    vectors = np.stack([np.frombuffer(e.vector, dtype="<f4") for e in embeddings]).astype(np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors, [(facts[e.study_pk].issuer or "", facts[e.study_pk].patient_id) for e in embeddings]
