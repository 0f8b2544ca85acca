"""Importer: wrap PNG/JPEG images listed in a CSV manifest into DICOM (CR or Secondary Capture).

Manifest columns: ``image`` (path relative to the manifest's folder) and ``patient_id`` are
required; optional ``study_date`` (YYYYMMDD or YYYY-MM-DD) or ``offset_days`` (days after
``--base-date``), ``sex``, ``age``, ``view``, ``study`` (rows with the same patient and study
key form one study; otherwise one study per image), ``patient_name``, ``birth_date``,
``duplicate_of`` (rows with it set are skipped with ``--skip-duplicates``).  Output follows the
``synth`` layout, ``DIR/<PatientID>/<StudyUID>/<SeriesUID>/<n>.dcm``, plus ``DIR/truth.json``
(patient_id is the truth) so benchmarks can score real images like synthetic ones.
"""
from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .dicom_writer import SOP_CLASSES, Instance, SeriesEncoder, patient_study_attrs, safe_component, uid
from .inject import InjectError, inject_errors

REQUIRED = ("image", "patient_id")


class ConvertError(Exception):
    """Bad input; ``code`` is the exit status to use."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _date(s: str, what: str) -> dt.date:
    s = s.strip()
    for fmt in ("%Y%m%d", "%Y-%m-%d"):
        try:
            return dt.datetime.strptime(s, fmt).date()
        except ValueError:
            pass
    raise ConvertError(f"{what}: {s!r} is not a date (YYYYMMDD or YYYY-MM-DD)", 2)


def _h(*parts) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little")


def _view(v: str) -> str:
    v = (v or "").strip().upper()
    if v.startswith("PA"):
        return "PA"
    if v.startswith("AP"):
        return "AP"
    if v in ("L", "LL", "LAT", "LATERAL"):
        return "LL"
    return ""


def _age(v: str) -> str:
    try:
        a = int(round(float(v)))
    except (TypeError, ValueError):
        return ""
    return f"{a:03d}Y" if 0 <= a <= 999 else ""


def _load(path: Path, sop: str) -> tuple[np.ndarray, str, int]:
    with Image.open(path) as im:
        im.load()
        if sop == "sc" and im.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LA"):
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
            if not (rgb[..., 0] == rgb[..., 1]).all() or not (rgb[..., 1] == rgb[..., 2]).all():
                return rgb, "RGB", 8
            return np.ascontiguousarray(rgb[..., 0]), "MONOCHROME2", 8
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            a = np.asarray(im, dtype=np.int64)
            return np.clip(a, 0, 65535).astype(np.uint16), "MONOCHROME2", 16
        return np.asarray(im.convert("L"), dtype=np.uint8), "MONOCHROME2", 8


def read_manifest(manifest: Path) -> tuple[list[str], list[dict]]:
    if not manifest.is_file():
        raise ConvertError(f"manifest {manifest} not found", 2)
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConvertError(f"cannot read manifest {manifest}: {exc}", 2) from exc
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ConvertError(f"manifest {manifest} lacks required column(s): {', '.join(missing)} "
                           f"(has: {', '.join(header) or 'no header'})", 2)
    return header, rows


def convert_manifest(manifest, out, sop="cr", issuer="IMPORT", base_date="20200101", seed=0, limit=None,
                     skip_duplicates=False, study_column="study", inject: dict | None = None) -> dict:
    """`inject`: keyword arguments of `inject.inject_errors` (second_ids, misfiled, seed, patients)."""
    manifest, out = Path(manifest), Path(out)
    base = _date(base_date, "--base-date")
    header, rows = read_manifest(manifest)
    if inject:
        try:
            rows = inject_errors(rows, **inject)
        except InjectError as exc:
            raise ConvertError(str(exc), 2) from exc
    root = manifest.parent
    studies: dict = {}
    records, skipped, files = [], 0, 0
    for i, row in enumerate(rows[:limit] if limit else rows):
        line = i + 2
        if skip_duplicates and row.get("duplicate_of"):
            skipped += 1
            continue
        pid, image = row.get("patient_id", ""), row.get("image", "")
        if not pid or not image:
            raise ConvertError(f"{manifest}:{line}: empty {'patient_id' if not pid else 'image'}", 2)
        path = root / image
        try:
            pixels, photometric, bits = _load(path, sop)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise ConvertError(f"{manifest}:{line}: cannot read image {path}: {exc}", 1) from exc
        if row.get("study_date"):
            date = _date(row["study_date"], f"{manifest}:{line}: study_date")
        elif row.get("offset_days"):
            try:
                date = base + dt.timedelta(days=int(round(float(row["offset_days"]))))
            except (ValueError, OverflowError) as exc:
                raise ConvertError(f"{manifest}:{line}: offset_days {row['offset_days']!r} is not a number", 2) from exc
        else:
            date = base
        key = row.get(study_column) if study_column in header and row.get(study_column) else f"image:{image}"
        skey = (pid, key)
        if skey not in studies:
            secs = 8 * 3600 + _h(seed, pid, key) % 36000
            st = {"study_uid": uid(seed, "convert-study", pid, key),
                  "series_uid": uid(seed, "convert-series", pid, key),
                  "patient_id": pid, "date": date.strftime("%Y%m%d"),
                  "time": f"{secs // 3600:02d}{secs // 60 % 60:02d}{secs % 60:02d}",
                  "accession": f"IMP{_h(seed, 'acc', pid, key) % 10 ** 8:08d}", "n": 0, "images": [],
                  "person_id": row.get("person_id") or pid, "error_id": row.get("error_id", ""),
                  "error_kind": row.get("error_kind", "")}
            studies[skey] = st
        st = studies[skey]
        st["n"] += 1
        view = _view(row.get("view", ""))
        sex = row.get("sex", "").upper()[:1]
        h = {"patient_id": pid, "issuer": issuer, "name": row.get("patient_name", ""),
             "birth_date": row.get("birth_date", "").replace("-", ""), "sex": sex if sex in ("M", "F", "O") else "",
             "age": _age(row.get("age", "")), "study_uid": st["study_uid"], "study_date": st["date"],
             "study_time": st["time"], "accession": st["accession"], "study_id": st["accession"][-6:],
             "study_description": "IMPORTED CHEST IMAGE", "manufacturer": "dicom-node convert", "charset": "ISO_IR 192"}
        modality = "CR" if sop == "cr" else "OT"
        common = patient_study_attrs(h) + [
            ("Modality", modality), ("SeriesInstanceUID", st["series_uid"]), ("SeriesNumber", 1),
            ("SeriesDescription", f"imported {view}".strip()), ("SeriesDate", st["date"]), ("SeriesTime", st["time"]),
            ("BodyPartExamined", row.get("body_part", "CHEST").upper() or "CHEST"),
            ("ContentDate", st["date"]), ("ContentTime", st["time"]),
        ]
        specific = [("InstanceNumber", st["n"]), ("ImageType", ["DERIVED", "SECONDARY"]), ("PatientOrientation", ""),
                    ("ViewPosition", view), ("BurnedInAnnotation", "YES" if sop == "sc" else "NO"),
                    ("ImageComments", f"converted from {Path(image).name}")]
        if sop == "sc":
            specific += [("ConversionType", "WSD")]
        sop_uid = uid(seed, "convert-sop", pid, image)
        inst = Instance(common, SOP_CLASSES["CR" if sop == "cr" else "SC"], sop_uid, specific, pixels,
                        photometric, bits)
        rel = Path(safe_component(pid)) / st["study_uid"] / st["series_uid"]
        try:
            SeriesEncoder(common).write(out / rel / f"{st['n']:04d}.dcm", inst)
        except OSError as exc:
            raise ConvertError(f"cannot write {out / rel}: {exc}", 1) from exc
        files += 1
        st["images"].append(image)
        records.append({"row": line, "image": image, "patient_id": pid, "study_uid": st["study_uid"],
                        "series_uid": st["series_uid"], "sop_uid": sop_uid,
                        "path": (rel / f"{st['n']:04d}.dcm").as_posix()})
    truth = {
        "format": "dicom-node-convert-truth/1", "manifest": manifest.name, "issuer": issuer,
        "persons": [{"person_id": p, "patient_ids": {issuer: p}}
                    for p in sorted({s["person_id"] for s in studies.values()})],
        "studies": [{"study_uid": s["study_uid"], "person_id": s["person_id"], "patient_id": s["patient_id"],
                     "issuer": issuer, "modality": "cxr", "dicom_modality": "CR" if sop == "cr" else "OT",
                     "date": s["date"], "series_uids": [s["series_uid"]], "images": s["images"],
                     "series": [{"series_uid": s["series_uid"], "n_instances": s["n"],
                                 "path": (Path(safe_component(s["patient_id"])) / s["study_uid"]
                                          / s["series_uid"]).as_posix()}]}
                    for s in studies.values()],
        "series": {s["series_uid"]: s["person_id"] for s in studies.values()},
        "errors": _errors(studies.values(), issuer), "rows": records,
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "truth.json").write_text(json.dumps(truth, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ConvertError(f"cannot write {out / 'truth.json'}: {exc}", 1) from exc
    return {"files": files, "patients": len(truth["persons"]), "studies": len(studies), "skipped": skipped}


def _errors(studies, issuer: str) -> list[dict]:
    """The injected errors in synth's truth form (what `linkage.scoring` reads)."""
    errors: dict[str, dict] = {}
    for s in studies:
        if s["error_id"]:
            e = errors.setdefault(s["error_id"], {
                "error_id": s["error_id"], "kind": s["error_kind"], "patient_id": s["patient_id"], "issuer": issuer,
                "person_id": s["person_id"], "study_uids": [], "study_keys": [],
                "variant": "second_id" if s["error_kind"] == "same_patient_different_id" else "wrong_patient"})
            e["study_uids"].append(s["study_uid"])
            e["study_keys"].append(f"{s['patient_id']}/cxr/{s['study_uid']}")
    return sorted(errors.values(), key=lambda e: e["error_id"])
