#!/usr/bin/env python3
"""The privacy audit on real radiographs (docs/privacy.md): a labelled image set converted to DICOM and
stored as the identified archive; the same images exported de-identified, with a pseudonym per study
and the key; `dicom-node privacy-audit --against-store --key` on the export, and `dicom-node evaluate
--from-db` on the archive for the Rank-1 that the attack should reproduce.

    .venv/bin/python benchmarks/privacy_audit.py --manifest ../shared/data/cxr-adult-figures/manifest.csv \
        --work /tmp/privacy-audit

Steps: `dicom-node convert` -> `db upgrade` -> `import` -> `process --until-idle --stable-now` (linkage
off: only the embeddings are needed) -> `deidentify` below -> `privacy-audit` (report in WORK/report)
-> `evaluate --from-db --baseline-backbone none` (WORK/evaluate.json; with a card that checks image
pairs this matches every pair of stored images: minutes for a few hundred). Prints both Rank-1s.
`--ocr` audits with `--ocr` too (burned-in text; needs the tesseract program).

`deidentify` is a test de-identifier, not a product one: new UIDs, the pseudonym as Patient ID and
Patient Name, dates, names, IDs, descriptions and private attributes removed; it can leave chosen
attributes in so that the audit's header check has something to find (tests/test_privacy_audit.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.linkage_accuracy import CONFIG as NODE_CONFIG  # noqa: E402 - the benchmarks' node.toml

CONFIG = NODE_CONFIG + "[linkage]\nenabled = false\n"      # only the embeddings are needed

# what `deidentify` removes (besides dates, times, UIDs and private attributes)
STRIP = {"OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "IssuerOfPatientID",
         "IssuerOfPatientIDQualifiersSequence", "PatientSex", "PatientAge", "PatientSize", "PatientWeight",
         "PatientAddress", "PatientBirthDate", "AccessionNumber", "StudyID", "ReferringPhysicianName",
         "PerformingPhysicianName", "OperatorsName", "InstitutionName", "InstitutionAddress",
         "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber", "StudyDescription", "SeriesDescription",
         "ImageComments", "ProtocolName", "DerivationDescription", "RequestedProcedureDescription",
         "PerformedProcedureStepDescription", "PatientComments", "AdditionalPatientHistory", "PlateID", "DetectorID"}
# what `deidentify(..., leave_in=True)` leaves behind: attributes with a value, and a private attribute
LEFT_IN = {"PatientBirthDate": "19700101", "InstitutionName": "ST ELSEWHERE", "DeviceSerialNumber": "SN-0042"}


def _strip(ds) -> None:
    for element in list(ds):
        if element.VR == "SQ":
            for item in element.value:
                _strip(item)
        keyword = element.keyword or ""
        if keyword in STRIP or keyword.endswith(("Date", "Time", "DateTime")):
            del ds[element.tag]


def deidentify(source: Path, out: Path, pseudonym_of, leave_in: bool = False) -> dict[str, str]:
    """Every DICOM file under `source` into `out` under the pseudonym `pseudonym_of(ds)`, new UIDs, the
    header emptied; with `leave_in`, LEFT_IN (the original value where there was one) and a private
    attribute stay behind. Returns the key: pseudonym -> original Patient ID."""
    import pydicom
    from pydicom.uid import generate_uid
    key = {}
    for n, path in enumerate(sorted(Path(source).rglob("*.dcm"))):
        ds = pydicom.dcmread(path)
        original = {k: ds.get(k) for k in LEFT_IN}
        pseudonym = pseudonym_of(ds)
        key[pseudonym] = str(ds.PatientID)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            if keyword in ds:
                setattr(ds, keyword, generate_uid(entropy_srcs=["privacy-audit", str(ds.get(keyword))]))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        _strip(ds)
        ds.remove_private_tags()
        ds.PatientID, ds.PatientName = pseudonym, pseudonym
        ds.PatientIdentityRemoved = "YES"
        if leave_in:
            for keyword, dummy in LEFT_IN.items():
                setattr(ds, keyword, original[keyword] or dummy)
            ds.private_block(0x0011, "ACME AUDIT 1.0", create=True).add_new(0x01, "LO", "kept by mistake")
        target = Path(out) / f"{n:05d}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target)
    return key


def write_key(path: Path, key: dict[str, str]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["pseudonym", "patient_id"])
        writer.writerows(sorted(key.items()))
    return path


def per_study():
    """A pseudonym per Study Instance UID: S0001, S0002, ..."""
    seen: dict[str, str] = {}
    return lambda ds: seen.setdefault(str(ds.StudyInstanceUID), f"S{len(seen) + 1:04d}")


def run(manifest: Path, work: Path, weights: Path, evaluate: bool = True, ocr: bool = False) -> dict:
    from dicom_node.cli import main
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "node.toml"
    cfg.write_text(CONFIG.format(work=work, weights=weights))

    def cli(*args: str) -> None:
        if main(["--config", str(cfg), *args]) != 0:
            raise SystemExit(f"dicom-node {' '.join(args[:2])} failed")

    converted = work / "converted"
    cli("convert", "--manifest", str(manifest), "--out", str(converted), "--quiet")
    cli("db", "upgrade")
    cli("import", *map(str, sorted(converted.rglob("*.dcm"))))
    cli("process", "--until-idle", "--stable-now")
    key = write_key(work / "key.csv", deidentify(converted, work / "export", per_study()))
    cli("privacy-audit", str(work / "export"), "--against-store", "--key", str(key), "--out", str(work / "report"),
        *(["--ocr"] if ocr else []))
    report = json.loads((work / "report" / "report.json").read_text())
    out = {"report": report}
    if evaluate:
        cli("evaluate", "--route", "chest_xr", "--from-db", "--baseline-backbone", "none",
            "--json", str(work / "evaluate.json"))
        out["evaluate"] = json.loads((work / "evaluate.json").read_text())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, default=REPO.parent / "shared/data/cxr-adult-figures/manifest.csv")
    parser.add_argument("--work", type=Path, required=True, help="empty folder for the archive, export and report")
    parser.add_argument("--weights-dir", type=Path, default=REPO / "models" / "weights")
    parser.add_argument("--no-evaluate", action="store_true", help="skip `evaluate --from-db`")
    parser.add_argument("--ocr", action="store_true", help="audit with --ocr (burned-in text, Tesseract)")
    args = parser.parse_args(argv)
    result = run(args.manifest, args.work.resolve(), args.weights_dir.resolve(), not args.no_evaluate, args.ocr)
    for route, r in result["report"]["routes"].items():
        ex, attack = r["export"], (r.get("archive") or {}).get("attack") or {}
        bands = ex["bands"]
        print(f"{route}: {ex['series']} images, {ex['pseudonyms']} pseudonyms, true pairs {ex['key']['true_pairs']}; "
              f"linked review+ {bands['review']['pairs']} (right {bands['review']['right']}), confident "
              f"{bands['confident']['pairs']} (right {bands['confident']['right']}); attack Rank-1 "
              f"{attack.get('rank1', float('nan')):.3f} Rank-5 {attack.get('rank5', float('nan')):.3f} "
              f"TAR@FAR1e-3 {attack.get('tar_at_far_1e-3', float('nan')):.3f} ({attack.get('queries', 0)} queries, "
              f"{r['archive']['archive_patients']} archive patients)")
    ocr = result["report"].get("ocr")
    if ocr:
        print(f"burned-in text: words on {len(ocr['with_text'])} of {ocr['checked']} images ({ocr['method']})")
    if "evaluate" in result:
        for name, m in result["evaluate"]["results"].items():
            print(f"evaluate --from-db {name}: Rank-1 {m['rank1']:.3f} Rank-5 {m['rank5']:.3f} "
                  f"({m['queries']} queries, {m['patients']} patients)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
