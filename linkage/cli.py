"""`dicom-node links` and `dicom-node review`: the archivist's flag list and decisions.

    dicom-node links [--status open|confirmed|rejected|all] [--kind K] [--format json|csv|table]
    dicom-node review LINK_ID --confirm|--reject|--reopen [--note TEXT] [--by NAME]

JSON is a list of objects: id, kind, status, band, probability, weight, a and b (each
patient_id, issuer, study_uid, series_uids, name, birth_date, sex, study_date,
description, modalities), evidence (per-field levels and weights, image evidence per
route, totals), created_at, updated_at, decided_at, decided_by, note. These commands are
for archivists with access to the database, so they show identifiers; logs never do.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import json
import sys

CSV_COLUMNS = ["id", "kind", "status", "band", "probability", "weight",
               "a_patient_id", "a_issuer", "a_study_uid", "a_study_date", "a_name",
               "b_patient_id", "b_issuer", "b_study_uid", "b_study_date", "b_name",
               "image_weight", "demographic_weight", "decided_by", "decided_at", "note"]


def _store(args):
    from db.engine import make_engine
    from db.links import LinkStore
    from db.migrate import upgrade
    from dicom_node.config import load_settings

    settings = load_settings(args.config)
    engine = make_engine(settings.database_url, settings.database.sqlite_synchronous)
    upgrade(engine)
    return LinkStore(engine)


def cmd_links(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.status == "worth-a-look":       # below the review band, ranked: weak evidence worth a glance
        views = store.list(status="open", kind=args.kind, bands=("worth-a-look",))
    else:
        status = None if args.status == "all" else args.status
        views = store.list(status=status, kind=args.kind, include_withdrawn=args.withdrawn)
    out = sys.stdout
    if args.format == "json":
        json.dump([v.to_json() for v in views], out, indent=2)
        out.write("\n")
    elif args.format == "csv":
        writer = csv.DictWriter(out, CSV_COLUMNS)
        writer.writeheader()
        for v in views:
            writer.writerow(_flat(v))
    else:
        _table(views, out)
    return 0


def _flat(v) -> dict:
    row = {k: getattr(v, k) for k in ("id", "kind", "status", "band", "decided_by", "decided_at", "note")}
    row.update(probability=f"{v.probability:.6f}", weight=f"{v.weight:.3f}",
               image_weight=v.evidence.get("image_weight"), demographic_weight=v.evidence.get("demographic_weight"))
    for side in ("a", "b"):
        s = getattr(v, side)
        row.update({f"{side}_patient_id": s.patient_id, f"{side}_issuer": s.issuer, f"{side}_study_uid": s.study_uid,
                    f"{side}_study_date": s.study_date, f"{side}_name": s.name})
    return row


def _table(views, out) -> None:
    if not views:
        out.write("no links\n")
        return
    header = f"{'id':>5}  {'kind':<26} {'status':<9} {'band':<12} {'P':>6}  {'a (ID^issuer, date)':<34} b\n"
    out.write(header)
    for v in views:
        a = f"{v.a.patient_id}^{v.a.issuer} {v.a.study_date or ''}"
        b = f"{v.b.patient_id}^{v.b.issuer} {v.b.study_date or ''}"
        out.write(f"{v.id:>5}  {v.kind:<26} {v.status:<9} {v.band:<12} {v.probability:6.3f}  {a:<34} {b}\n")
    out.write(f"{len(views)} link(s)\n")


def cmd_review(args: argparse.Namespace) -> int:
    from db.links import LinkError
    from linkage.evidence import reestimate

    store = _store(args)
    decision = "confirm" if args.confirm else "reject" if args.reject else "reopen"
    try:
        view = store.review(args.link_id, decision, args.by, args.note)
    except LinkError as error:
        print(f"dicom-node review: {error}", file=sys.stderr)
        return 1
    # Every decision refines the m/u weights used for the next links (linkage.evidence).
    store.save_match_weights(reestimate(store.decided_pairs()))
    print(f"link {view.id} ({view.kind}) is now {view.status} (by {view.decided_by or args.by})")
    return 0


def add_subcommands(subparsers) -> None:
    links = subparsers.add_parser("links", help="list flagged identity links")
    links.add_argument("--status", choices=("open", "confirmed", "rejected", "all", "worth-a-look"), default="open",
                       help="open: the flags to review (default); worth-a-look: open links below the review band "
                            "from [linkage] worth_a_look_probability, most probable first")
    links.add_argument("--kind", choices=("same_patient_different_id", "different_patient_same_id"), default=None)
    links.add_argument("--format", choices=("json", "csv", "table"), default="table")
    links.add_argument("--withdrawn", action="store_true",
                       help="also list open links below the review threshold (withdrawn and worth-a-look)")
    links.set_defaults(handler=cmd_links)

    review = subparsers.add_parser("review", help="confirm, reject or reopen a link (audited)")
    review.add_argument("link_id", type=int, metavar="LINK_ID")
    choice = review.add_mutually_exclusive_group(required=True)
    choice.add_argument("--confirm", action="store_true")
    choice.add_argument("--reject", action="store_true")
    choice.add_argument("--reopen", action="store_true")
    review.add_argument("--note", default=None, help="why (kept in the audit trail)")
    review.add_argument("--by", default=_user(), help="who decides (default: the login name)")
    review.set_defaults(handler=cmd_review)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        return "unknown"
