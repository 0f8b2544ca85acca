"""``dicom-node synth`` and ``dicom-node convert`` sub-commands.

``add_subcommands(subparsers)`` adds both to an argparse sub-parsers object; each sets
``handler=FUNC`` where ``FUNC(args) -> int`` is the exit code.  Runnable on its own as
``python -m synth.cli synth|convert ...``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .settings import MODALITIES, PRESETS, SynthConfig

SIZE_OPTIONS = ("cxr_size", "ct_size", "ct_slices", "mr_size", "mr_slices", "fundus_size", "derm_size")


def _modalities(values) -> list[str]:
    out = []
    for v in values or ["all"]:
        for m in str(v).replace(",", " ").split():
            m = m.lower()
            if m == "all":
                out.extend(x for x in MODALITIES if x not in out)
            elif m in MODALITIES:
                if m not in out:
                    out.append(m)
            else:
                raise ValueError(f"unknown modality {m!r} (choose from {', '.join(MODALITIES)}, all)")
    return [m for m in MODALITIES if m in out]


def _nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def build_config(args) -> SynthConfig:
    if args.patients < 1:
        raise ValueError("--patients must be at least 1")
    if args.visits < 1:
        raise ValueError("--visits must be at least 1")
    if not 0.0 <= args.error_rate <= 1.0:
        raise ValueError("--error-rate must lie in [0, 1]")
    if not 1 <= args.sites <= 6:
        raise ValueError("--sites must lie in 1..6")
    if not 0.0 <= args.twin_rate <= 1.0:
        raise ValueError("--twin-rate must lie in [0, 1]")
    if args.nuisance < 0:
        raise ValueError("--nuisance must be >= 0")
    sizes = dict(PRESETS[args.preset])
    for k in SIZE_OPTIONS:
        v = getattr(args, k)
        if v is not None:
            if not 8 <= v <= 2048:
                raise ValueError(f"--{k.replace('_', '-')} must lie in 8..2048")
            sizes[k] = v
    return SynthConfig(seed=args.seed, patients=args.patients, visits=args.visits,
                       modalities=_modalities(args.modalities), error_rate=args.error_rate,
                       sites=args.sites, twin_rate=args.twin_rate, nuisance=args.nuisance,
                       derm_sop=args.derm_sop, **sizes)


def synth_handler(args) -> int:
    from .cohort import generate
    try:
        cfg = build_config(args)
    except ValueError as exc:
        print(f"dicom-node synth: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"dicom-node synth: error: {out} exists and is not a directory", file=sys.stderr)
        return 2
    if _nonempty(out) and not args.overwrite:
        print(f"dicom-node synth: error: {out} is not empty (use --overwrite to write into it)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        summary = generate(cfg, out, jobs=args.jobs)
    except OSError as exc:
        print(f"dicom-node synth: error: {exc}", file=sys.stderr)
        return 1
    secs = time.perf_counter() - t0
    if not args.quiet:
        print(f"wrote {summary['files']} files ({summary['bytes'] / 1e6:.1f} MB) for {summary['persons']} persons, "
              f"{summary['studies']} studies, {summary['series']} series, {summary['errors']} injected errors "
              f"in {secs:.1f} s -> {out}/truth.json")
    return 0


def _patient_list(path: str) -> set[str]:
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json"):
        ids = json.loads(text).get("validation_patients")
        if not ids:
            raise ValueError("the card lists no validation_patients")
        return set(ids)
    return {line.strip() for line in text.splitlines() if line.strip()}


def convert_handler(args) -> int:
    from .convert import ConvertError, convert_manifest
    out = Path(args.out)
    if _nonempty(out) and not args.overwrite:
        print(f"dicom-node convert: error: {out} is not empty (use --overwrite to write into it)", file=sys.stderr)
        return 2
    inject = None
    if args.second_ids or args.misfiled:
        try:
            patients = _patient_list(args.patients_from) if args.patients_from else None
        except (OSError, ValueError) as exc:
            print(f"dicom-node convert: error: --patients-from {args.patients_from}: {exc}", file=sys.stderr)
            return 2
        inject = {"second_ids": args.second_ids, "misfiled": args.misfiled, "seed": args.error_seed,
                  "patients": patients}
    try:
        summary = convert_manifest(args.manifest, out, sop=args.sop, issuer=args.issuer,
                                   base_date=args.base_date, seed=args.seed, limit=args.limit,
                                   skip_duplicates=args.skip_duplicates, study_column=args.study_column,
                                   inject=inject)
    except ConvertError as exc:
        print(f"dicom-node convert: error: {exc}", file=sys.stderr)
        return exc.code
    if not args.quiet:
        print(f"wrote {summary['files']} files for {summary['patients']} patients, {summary['studies']} studies "
              f"({summary['skipped']} rows skipped) -> {out}")
    return 0


def add_subcommands(subparsers) -> None:
    """Add the ``synth`` and ``convert`` sub-parsers (each with ``handler`` set)."""
    p = subparsers.add_parser(
        "synth", help="generate a synthetic multi-modality cohort with ground truth",
        description="Generate synthetic persons with several studies over time (chest radiograph, chest CT, "
                    "brain MR, fundus photograph, dermoscopy) as DICOM, with registration noise, injected "
                    "Patient ID errors and DIR/truth.json. Same seed, same bytes.")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created; must be empty)")
    p.add_argument("--patients", type=int, default=20, metavar="N", help="number of persons (default 20)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--modalities", nargs="+", default=["all"], metavar="M",
                   help=f"modalities: {' '.join(MODALITIES)} or all (default all)")
    p.add_argument("--visits", type=int, default=3, metavar="V", help="studies per person and modality (default 3)")
    p.add_argument("--error-rate", type=float, default=0.05, metavar="R",
                   help="probability that a study gets an injected Patient ID error (default 0.05)")
    p.add_argument("--sites", type=int, default=3, metavar="K", help="sites / issuers of Patient ID, 1..6 (default 3)")
    p.add_argument("--twin-rate", type=float, default=0.1, metavar="R",
                   help="fraction of persons that are near-twin siblings of another (default 0.1)")
    p.add_argument("--nuisance", type=float, default=1.0, metavar="X",
                   help="scale of visit-to-visit variation; 0 keeps pose, exposure etc. fixed (default 1)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="image size preset: small (tests), default, large (CT 64x256x256)")
    for k in SIZE_OPTIONS:
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None, metavar="N",
                       help=f"override the preset's {k.replace('_', ' ')}")
    p.add_argument("--derm-sop", choices=["dms", "vl"], default="dms",
                   help="dermoscopy as Dermoscopic Photography (Modality DMS, default) or VL Photographic (XC)")
    p.add_argument("--jobs", type=int, default=None, metavar="J", help="worker processes (default: CPU count)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(handler=synth_handler)

    c = subparsers.add_parser(
        "convert", help="wrap PNG/JPEG images listed in a CSV manifest into DICOM",
        description="Convert images listed in a CSV manifest (columns image, patient_id; optional study_date "
                    "or offset_days, sex, age, view, study, patient_name, birth_date) into DICOM, one study per "
                    "image unless a study key is given. Image paths are relative to the manifest's folder.")
    c.add_argument("--manifest", required=True, metavar="CSV", help="manifest CSV file")
    c.add_argument("--out", required=True, metavar="DIR", help="output directory (created; must be empty)")
    c.add_argument("--sop", choices=["cr", "sc"], default="cr",
                   help="CR Image Storage (grayscale, default) or Secondary Capture (keeps colour)")
    c.add_argument("--issuer", default="IMPORT", help="Issuer of Patient ID (default IMPORT)")
    c.add_argument("--base-date", default="20200101", metavar="YYYYMMDD",
                   help="study date for offset_days 0 or rows without a date (default 20200101)")
    c.add_argument("--seed", type=int, default=0, help="UID seed (default 0)")
    c.add_argument("--limit", type=int, default=None, metavar="N", help="convert only the first N rows")
    c.add_argument("--skip-duplicates", action="store_true", help="skip rows whose duplicate_of is set")
    c.add_argument("--study-column", default="study", metavar="NAME",
                   help="column grouping rows into one study (default 'study', used when present)")
    c.add_argument("--second-ids", type=int, default=0, metavar="N",
                   help="inject N second IDs (a person's later studies under a new Patient ID); names and birth "
                        "dates are then blank and truth.json lists the errors (synth/inject.py)")
    c.add_argument("--misfiled", type=int, default=0, metavar="N",
                   help="inject N studies filed under another patient's ID, with that patient's sex and age")
    c.add_argument("--error-seed", type=int, default=0, metavar="S", help="where the errors fall (default 0)")
    c.add_argument("--patients-from", metavar="FILE",
                   help="only these patients: a model card's validation_patients (card.json) or one ID per line")
    c.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    c.add_argument("--quiet", action="store_true", help="print nothing on success")
    c.set_defaults(handler=convert_handler)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m synth.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommands(sub)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
