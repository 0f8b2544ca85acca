"""`dicom-node priors` and `dicom-node export`: what confirmed links mean for the records.

    dicom-node priors (--patient-id ID [--issuer I] | --study-uid UID) [--format json|table]
    dicom-node export --format csv|hl7 [--kind merges|misfiled] [--home-issuer I] [--out FILE]

Output shapes and rules are documented in `linkage.priors` and `linkage.export`. Exit codes:
0 done, 1 unknown patient or study, 2 ambiguous or invalid request. These commands are for
archivists with database access, so they show identifiers; logs never do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def _store(args):
    from db.engine import make_engine
    from db.links import LinkStore
    from db.migrate import upgrade
    from dicom_node.config import load_settings

    settings = load_settings(args.config)
    engine = make_engine(settings.database_url, settings.database.sqlite_synchronous)
    upgrade(engine)  # as `links` does: a fresh database answers "unknown patient", not a schema error
    return LinkStore(engine)


def _write(text: str, out: Path | None) -> None:
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    # Write-then-rename: a consumer polling the folder never picks up half an export.
    out = out.resolve()
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cmd_priors(args: argparse.Namespace) -> int:
    from linkage.priors import PriorsError, format_table, priors

    store = _store(args)
    try:
        result = priors(store, patient_id=args.patient_id, issuer=args.issuer, study_uid=args.study_uid)
    except PriorsError as error:
        print(f"dicom-node priors: {error}", file=sys.stderr)
        return error.exit_code
    finally:
        store.engine.dispose()
    if args.format == "json":
        _write(json.dumps(result, indent=2) + "\n", None)
    else:
        _write(format_table(result), None)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from linkage.export import merges, merges_csv, merges_hl7, misfiled_csv

    if args.kind == "misfiled" and args.format == "hl7":
        print("dicom-node export: misfiled studies are exported as CSV only (HL7 ADT has no "
              "message that moves one study)", file=sys.stderr)
        return 2
    store = _store(args)
    try:
        if args.kind == "misfiled":
            text = misfiled_csv(store)
            count = text.count("\n") - 1
        else:
            rows = merges(store, home_issuer=args.home_issuer)
            text = merges_csv(rows) if args.format == "csv" else merges_hl7(rows)
            count = len(rows)
    finally:
        store.engine.dispose()
    _write(text, args.out)
    if args.out is not None:
        print(f"exported {count} {'merges' if args.kind == 'merges' else 'misfiled studies'} to {args.out}")
    return 0


def add_subcommands(subparsers) -> None:
    priors = subparsers.add_parser(
        "priors", help="a person's studies across IDs joined by confirmed links",
        description="A person's studies across every Patient ID joined by confirmed "
                    "same_patient_different_id links, oldest first. Confirmed misfiled studies and "
                    "open links are listed apart, never in the timeline.")
    which = priors.add_mutually_exclusive_group(required=True)
    which.add_argument("--patient-id", help="Patient ID (0010,0020)")
    which.add_argument("--study-uid", help="a Study Instance UID of the person")
    priors.add_argument("--issuer", default=None,
                        help="Issuer of Patient ID; needed when the ID exists under several issuers")
    priors.add_argument("--format", choices=("json", "table"), default="table")
    priors.set_defaults(handler=cmd_priors)

    export = subparsers.add_parser(
        "export", help="confirmed merges (CSV or HL7 ADT^A40) or misfiled studies (CSV)",
        description="Export confirmed decisions. merges: one row / ADT^A40 message per merged Patient ID, "
                    "one surviving ID per person. misfiled: one CSV row per study to move.")
    export.add_argument("--format", choices=("csv", "hl7"), required=True)
    export.add_argument("--kind", choices=("merges", "misfiled"), default="merges")
    export.add_argument("--home-issuer", default=None,
                        help="IDs of this issuer survive a merge (else the ID with the oldest study)")
    export.add_argument("--out", type=Path, default=None, help="write to FILE instead of standard output")
    export.set_defaults(handler=cmd_export)
