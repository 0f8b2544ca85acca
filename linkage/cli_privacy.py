"""`dicom-node privacy-audit EXPORT [--against-store] [--key CSV] [--out DIR]`: how re-identifiable is a
de-identified export? (linkage.privacy decides, linkage.privacy_input reads, linkage.privacy_report writes)

    EXPORT            a folder of DICOM files, or a manifest CSV (image, patient_id = the pseudonym) with --route
    --key CSV         pseudonym,patient_id: the de-identification key, to score the attack exactly
    --against-store   also match every exported image with the patients of the node's store
    --out DIR         report.json, index.html, plots/, thumbs/ (pseudonyms only)
    --ocr             burned-in text: words Tesseract reads in each series' first image (counted, not shown)

The printed summary and the report hold pseudonyms, export-local labels and counts, never the
archive's Patient IDs or header values. Exit 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _fail(message: str) -> int:
    print(f"dicom-node privacy-audit: {message}", file=sys.stderr)
    return 2


def _open_store(settings):
    from db.engine import make_engine
    from db.links import LinkStore
    from db.migrate import current_revision, head_revision
    engine = make_engine(settings.database_url, settings.database.sqlite_synchronous)
    if current_revision(engine) != head_revision():
        raise ValueError(f"the node's database is not at revision {head_revision()}: run `dicom-node db upgrade` "
                         "(or point --config at the node whose store to audit against)")
    return LinkStore(engine)


def cmd_privacy_audit(args: argparse.Namespace) -> int:
    from dicom_node.config import load_settings
    from linkage import privacy_input as I
    export: Path = args.export
    if not export.exists():
        return _fail(f"{export}: no such file or folder")
    if export.is_file() and not args.route:
        return _fail("a manifest export needs --route (the identity model to attack it with)")
    if export.is_dir() and args.route:
        return _fail("--route is for a manifest export; a DICOM folder is routed as the node routes it")
    settings = load_settings(args.config)
    weights = args.weights_dir or settings.resolve(settings.pipeline.weights_dir)
    if not weights.is_dir():         # untrained networks would embed, and the audit would find nothing
        return _fail(f"{weights}: no model registry folder (pipeline.weights_dir, or --weights-dir)")
    ocr = None
    if args.ocr:
        from linkage.privacy_pixels import ocr_available
        ocr = ocr_available()
        if ocr is None:
            return _fail("--ocr needs the tesseract program (Debian: apt-get install tesseract-ocr)")
    try:
        key = I.read_key(args.key) if args.key else None
        store = _open_store(settings) if args.against_store else None
    except (I.AuditInputError, ValueError) as error:
        return _fail(str(error))
    import torch
    torch.set_num_threads(settings.pipeline.torch_threads)
    try:
        if export.is_dir():
            data = I.embed_dicom(export, settings.pipeline, weights)
        else:
            from models.inference.pipeline import pick_device
            data = I.embed_manifest(export, args.route, weights, pick_device(settings.pipeline.device))
    except I.AuditInputError as error:
        return _fail(str(error))
    report = audit(data, settings, weights, key, store, ocr)
    report.update(export=export.name, input=data.kind)
    for line in report["summary"] if not args.out else []:
        print(line)
    if args.out:
        from linkage.privacy_report import write
        clean = write(report, args.out, {s.label: s.paths for s in data.images()})
        print("\n".join(clean["summary"]))
        print(f"report: {args.out}/index.html, {args.out}/report.json")
    return 0


def audit(data, settings, weights: Path, key: dict | None, store, ocr: str | None = None) -> dict:
    """The audit's figures as plain data: per route the export's linkability and (with a store) the
    attack against the archive; the header check; with `ocr` (Tesseract's version) burned-in text;
    what was not audited and why."""
    from linkage.engine import model_calibrations, registry_cards, settings_thresholds
    from linkage.privacy import linkability, reidentification
    from linkage.privacy_input import store_gallery
    from linkage.privacy_report import summary
    t = settings_thresholds(settings.linkage)
    calibrations = model_calibrations(registry_cards(weights))
    by_model: dict[tuple, list] = {}
    for s in data.series:
        by_model.setdefault(s.model_key, []).append(s)
    routes, not_audited = {}, dict(data.skipped)
    for model_key, series in sorted(by_model.items()):
        calibration = calibrations.get(model_key)
        entry = {"export": linkability(series, calibration, t, key)}
        if store is not None:
            gallery, patients = store_gallery(store, model_key)
            if len(patients):
                entry["archive"] = reidentification(series, gallery, patients, calibration, t, key)
            else:
                entry["archive_note"] = "the store holds no embeddings of this model"
        routes[model_key[0]] = entry
    headers = None
    if data.headers is not None:
        uids = store.known_uids(data.headers.uids) if store is not None else None
        headers = data.headers.result(uids, key, {s.pseudonym for s in data.series})
    report = {"routes": routes, "not_audited": not_audited, "headers": headers,
              "settings": {"review_probability": t.review, "confident_probability": t.confident,
                           "prior_same_person": t.prior_same, "max_image_llr": t.max_image_llr,
                           "score": "cosine of the embeddings, the model card's cosine calibration",
                           "key": key is not None, "against_store": store is not None}}
    if ocr:
        from linkage.privacy_pixels import burned_in_text
        report["ocr"] = burned_in_text(data.images(), ocr)
    report["summary"] = summary(report)
    return report


def add_subcommands(subparsers) -> None:
    audit_parser = subparsers.add_parser(
        "privacy-audit", help="how re-identifiable is a de-identified export: linkable pseudonyms, matches in the "
                              "archive, header attributes left (pseudonyms only in the report)")
    audit_parser.add_argument("export", type=Path, metavar="EXPORT",
                              help="folder of DICOM files, or a manifest CSV (image, patient_id = pseudonym)")
    audit_parser.add_argument("--key", type=Path, default=None, metavar="CSV",
                              help="de-identification key: columns pseudonym, patient_id (original Patient ID)")
    audit_parser.add_argument("--against-store", action="store_true",
                              help="match every exported image with the patients of the node's store")
    audit_parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                              help="report folder: index.html, report.json, plots/, thumbs/")
    audit_parser.add_argument("--ocr", action="store_true",
                              help="read burned-in text in the first image of each series (Tesseract; the report "
                                   "counts words, never shows them)")
    audit_parser.add_argument("--route", default=None, help="a manifest export: the route whose model attacks it")
    audit_parser.add_argument("--weights-dir", type=Path, default=None,
                              help="registry folder (default pipeline.weights_dir)")
    audit_parser.set_defaults(handler=cmd_privacy_audit)
