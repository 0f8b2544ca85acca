"""What the pages and the JSON API show and do, as plain data, read through the db stores
and linkage functions (the web package is an edge, like dicom_node/).

Every function returns dicts/lists ready for a template or for JSON; the HTML routes
(`web.pages`) and the API (`web.api`) are thin layers over these.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

from sqlalchemy import Engine

from db.accounts import AccountStore
from db.links import LinkError, LinkStore
from db.store import IdentityStore, utcnow
from dicom_node.config import Settings
from web.thumbnails import ThumbnailCache

KIND_LABELS = {"same_patient_different_id": "same patient, different ID",
               "different_patient_same_id": "different patient, same ID"}
QUEUE_STATES = ("receiving", "stable", "processing")


class NotFound(Exception):
    pass


class Conflict(Exception):
    pass


class WebContext:
    """The stores and settings one web app works with."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.links = LinkStore(engine)
        self.identity = IdentityStore(engine)
        self.accounts = AccountStore(engine)
        self.weights_dir = settings.resolve(settings.pipeline.weights_dir)
        self.thumbnails = ThumbnailCache(self.identity, settings.storage_dir)


# ----- dashboard ---------------------------------------------------------------------------

def model_cards(weights_dir: Path) -> list[dict]:
    """Name and version of every model card in the weights registry, by route folder."""
    cards = []
    for card in sorted(weights_dir.glob("*/card.json")) if weights_dir.is_dir() else []:
        try:
            data = json.loads(card.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cards.append({"route": card.parent.name, "name": "?", "version": "unreadable card.json"})
            continue
        cards.append({"route": card.parent.name, "name": data.get("name", "?"),
                      "version": data.get("version", "?"), "date": data.get("date"),
                      "adapted_on": (data.get("adaptation") or {}).get("source")})
    return cards


def with_embedding_counts(cards: list[dict], counts: dict[tuple[str, str, str], int]) -> list[dict]:
    """Each card with how many stored series its model embedded and how many another model did: those are
    compared with nothing new until `dicom-node process --until-idle --reembed` embeds them again."""
    out = []
    for card in cards:
        mine = (card["route"], card["name"], card["version"])
        out.append({**card, "embedded": counts.get(mine, 0),
                    "embedded_by_other_models": sum(n for key, n in counts.items()
                                                    if key[0] == card["route"] and key != mine)})
    return out


def dashboard(ctx: WebContext) -> dict:
    now = utcnow().replace(minute=0, second=0, microsecond=0)
    start = now - timedelta(hours=23)
    per_hour = ctx.identity.instances_per_hour(start)
    hours = []
    for n in range(24):
        hour = start + timedelta(hours=n)
        key = hour.strftime("%Y-%m-%dT%H")
        hours.append({"hour": key, "label": hour.strftime("%H:00"), "count": per_hour.get(key, 0)})
    counts = ctx.identity.counts()
    by_state = counts["series"]
    links = ctx.links.link_counts()
    return {
        "generated_at": utcnow().isoformat(timespec="seconds"),
        "instances_per_hour": hours,
        "instances_24h": sum(h["count"] for h in hours),
        "series_by_state": by_state,
        "queue_depth": sum(by_state.get(s, 0) for s in QUEUE_STATES),
        "failed_series": by_state.get("failed", 0),
        "totals": {k: counts[k] for k in ("patients", "studies", "instances", "bytes")},
        "models": with_embedding_counts(model_cards(ctx.weights_dir), ctx.identity.embedding_counts()),
        "links": links,
        "open_flags": links.get("open", 0),
    }


# ----- links -------------------------------------------------------------------------------

def _side_summary(side) -> dict:
    return {"patient_id": side.patient_id, "issuer": side.issuer, "name": side.name,
            "birth_date": side.birth_date, "sex": side.sex, "study_date": side.study_date,
            "modalities": list(side.modalities), "description": side.description}


def queue(ctx: WebContext, worth_a_look: bool = False) -> list[dict]:
    """Open links for review, most probable first; or the ranked "worth a look" list below them."""
    views = ctx.links.list(status="open", bands=("worth-a-look",)) if worth_a_look else ctx.links.list(status="open")
    return [{"id": v.id, "kind": v.kind, "kind_label": KIND_LABELS.get(v.kind, v.kind), "band": v.band,
             "probability": v.probability, "weight": v.weight, "created_at": v.created_at,
             "a": _side_summary(v.a), "b": _side_summary(v.b)}
            for v in views]


def _get(ctx: WebContext, link_id: int):
    try:
        return ctx.links.get(link_id)
    except LinkError:
        raise NotFound(f"no link {link_id}") from None


def review_item(ctx: WebContext, link_id: int) -> dict:
    """One link with both studies (internal pks for thumbnails and timelines), the evidence
    laid out per field and per route, and its neighbours in the open queue."""
    view = _get(ctx, link_id)
    records = {r.study_uid: r for r in ctx.links.find_studies(study_uids=[view.a.study_uid, view.b.study_uid])}
    series = ctx.identity.study_series(r.study_pk for r in records.values())
    labels = (("suspect study", "compared study of the same ID") if view.kind == "different_patient_same_id"
              else ("study under the first ID", "study under the second ID"))
    sides = []
    for label, side in zip(labels, (view.a, view.b)):
        record = records.get(side.study_uid)
        sides.append({"label": label, **asdict(side),
                      "study_pk": record.study_pk if record else None,
                      "patient_pk": record.patient_pk if record else None,
                      "accession_number": record.accession_number if record else None,
                      "series": [asdict(s) for s in series.get(record.study_pk, [])] if record else []})
    evidence = view.evidence or {}
    fields = [{"field": name, "level": value.get("level"), "weight": value.get("weight"), "note": value.get("note")}
              for name, value in (evidence.get("fields") or {}).items()]
    image = [{"route": route, **value} for route, value in sorted((evidence.get("image") or {}).items())]
    open_ids = ctx.links.open_link_ids()
    position = open_ids.index(link_id) if link_id in open_ids else None
    neighbours = {"previous": None, "next": None, "position": None, "open": len(open_ids)}
    if position is not None:
        neighbours.update(position=position + 1,
                          previous=open_ids[position - 1] if position > 0 else None,
                          next=open_ids[position + 1] if position + 1 < len(open_ids) else None)
    elif open_ids:
        neighbours["next"] = open_ids[0]
    return {"link": view.to_json(), "kind_label": KIND_LABELS.get(view.kind, view.kind), "sides": sides,
            "fields": fields, "image": image,
            "totals": {"image_weight": evidence.get("image_weight"),
                       "demographic_weight": evidence.get("demographic_weight"),
                       "total_weight": evidence.get("total_weight", view.weight),
                       "prior": evidence.get("prior"), "probability": view.probability,
                       "hypothesis": evidence.get("hypothesis"), "note": evidence.get("note"),
                       "left_out_studies": evidence.get("left_out_studies") or []},
            "events": [asdict(e) for e in ctx.links.events(link_id)],
            "neighbours": neighbours}


def decide(ctx: WebContext, link_id: int, decision: str, user: str, note: str | None) -> dict:
    """confirm | reject | reopen, as `dicom-node review` does: LinkStore.review writes the
    link_event, the m/u weights are re-estimated from every decided link, and the web
    audit trail gets the decision too. Returns the next open link id (or None) and the link."""
    from linkage.evidence import reestimate

    before = _get(ctx, link_id)
    open_ids = ctx.links.open_link_ids()
    note = (note or "").strip() or None
    try:
        view = ctx.links.review(link_id, decision, user, note)
    except LinkError as error:
        raise Conflict(str(error)) from None
    ctx.links.save_match_weights(reestimate(ctx.links.decided_pairs()))
    ctx.accounts.audit(user, f"link_{decision}", f"link:{link_id}",
                       {"from": before.status, "to": view.status, "kind": view.kind,
                        "probability": round(view.probability, 4), "note": note is not None})
    after = open_ids[open_ids.index(link_id) + 1:] if link_id in open_ids else open_ids
    still_open = set(ctx.links.open_link_ids())
    following = next((i for i in after if i in still_open), None)
    if following is None:
        following = next((i for i in open_ids if i in still_open), None)
    return {"link": view.to_json(), "next": following}


# ----- patients ----------------------------------------------------------------------------

def timeline(ctx: WebContext, patient_pk: int) -> dict:
    """linkage.priors for one patient row, with internal pks added for navigation: each
    study marked with how it joined the person (own ID or a confirmed link) and the open
    links that touch it; open links and misfiled studies listed apart."""
    from linkage.priors import OWN, PriorsError, priors

    record = ctx.links.patient_records([patient_pk]).get(patient_pk)
    if record is None:
        raise NotFound(f"no patient {patient_pk}")
    try:
        if record.patient_id:
            result = priors(ctx.links, patient_id=record.patient_id, issuer=record.issuer)
        else:
            # DICOM allows an empty Patient ID, which priors() refuses as a key: seed by one of the
            # row's studies instead, which names the same patient row.
            own = ctx.links.find_studies(patient_pks=[patient_pk])
            if not own:
                raise NotFound(f"patient {patient_pk} has no studies")
            result = priors(ctx.links, study_uid=own[0].study_uid)
    except PriorsError as error:
        raise NotFound(str(error)) from None
    uids = [s["study_uid"] for s in result["studies"] + result["misfiled"]]
    uids += [o["other_study_uid"] for o in result["open_links"]]
    studies = {r.study_uid: r for r in ctx.links.find_studies(study_uids=uids)} if uids else {}
    open_by_study: dict[str, list[int]] = {}
    for link in result["open_links"]:
        open_by_study.setdefault(link["study_uid"], []).append(link["id"])
        other = studies.get(link["other_study_uid"])
        link["other_patient_pk"] = other.patient_pk if other else None
        link["kind_label"] = KIND_LABELS.get(link["kind"], link["kind"])
    for entry in result["studies"] + result["misfiled"]:
        found = studies.get(entry["study_uid"])
        entry["study_pk"] = found.study_pk if found else None
        entry["patient_pk"] = found.patient_pk if found else None
        entry["link_state"] = "own ID" if entry["via"] == OWN else "confirmed link"
        entry["open_links"] = open_by_study.get(entry["study_uid"], [])
    pks = {(r.patient_id, r.issuer): r.patient_pk for r in studies.values()}
    for entry in result["ids"]:
        entry["patient_pk"] = pks.get((entry["patient_id"], entry["issuer"]))
    result["patient"]["patient_pk"] = patient_pk
    return result


def search(ctx: WebContext, patient_id: str | None, issuer: str | None, name: str | None) -> list[dict]:
    pks = ctx.identity.find_patient_pks(patient_id, issuer, name)
    records = ctx.links.patient_records(pks)
    return [asdict(records[pk]) for pk in pks if pk in records]


# ----- audit -------------------------------------------------------------------------------

def audit_log(ctx: WebContext, limit: int = 200) -> dict:
    return {"link_events": [asdict(e) for e in ctx.links.events(limit=limit)],
            "audit_events": [asdict(e) for e in ctx.accounts.audit_events(limit=limit)]}


def users(ctx: WebContext) -> list[dict]:
    return [{k: v for k, v in asdict(u).items() if k != "password_hash"} for u in ctx.accounts.users()]
