"""Priors: one person's studies across every Patient ID that confirmed links joined.

A person is a Patient ID (with its issuer) plus every ID joined to it, transitively, by
CONFIRMED same_patient_different_id links. Open links are suggestions, never evidence:
they are listed apart (`open_links`) and never add a study to the timeline. A study that a
confirmed different_patient_same_id link says is not this patient's is taken out of the
timeline and listed under `misfiled`, so a viewer never shows someone else's images as a
prior.

`priors(store, ...)` returns plain data, printed by `dicom-node priors --format json`:

    {
      "patient":  {"patient_id", "issuer", "name", "birth_date", "sex"},    # the ID asked for (*)
      "ids":      [{"patient_id", "issuer", "via"}],                        # the person's IDs
      "studies":  [{"patient_id", "issuer", "study_uid", "date", "time", "accession_number",
                    "description", "modalities": [..], "series_count", "via"}],
      "misfiled": [{...the same study fields..., "link_id"}],
      "open_links": [{"id", "kind", "band", "probability", "study_uid",
                      "other_patient_id", "other_issuer", "other_study_uid"}]
    }

(*) demographics as the newest non-misfiled study of that ID carried them.
`via` is "own" for the ID asked for (every issuer of it when no issuer was given and only
one exists) or the integer id of the confirmed link through which that ID joined the
person (the first link on the shortest path, links taken in id order). `studies` and
`misfiled` are ordered oldest first by study date, then time, then Study Instance UID;
undated studies come last. `open_links` are most probable first; `study_uid` is this
person's study in the link and `other_*` the other side (for different_patient_same_id the
suspect study).
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable

from db.links import LinkStore
from db.records_linkage import MergeEdge, PatientRecord, StudyRecord

OWN = "own"


class PriorsError(Exception):
    """The person cannot be determined (unknown or ambiguous identifier)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ----- person grouping (also used by C-FIND and export) --------------------------------

def components(edges: Iterable[MergeEdge]) -> dict[int, frozenset[int]]:
    """Patient pk -> every patient pk of its person, for the patients these edges touch."""
    parent: dict[int, int] = {}

    def root(pk: int) -> int:
        parent.setdefault(pk, pk)
        while parent[pk] != pk:
            parent[pk] = parent[parent[pk]]
            pk = parent[pk]
        return pk

    for edge in edges:
        parent[root(edge.a_patient_pk)] = root(edge.b_patient_pk)
    groups: dict[int, set[int]] = defaultdict(set)
    for pk in list(parent):
        groups[root(pk)].add(pk)
    return {pk: frozenset(group) for group in groups.values() for pk in group}


def reached_via(seeds: Iterable[int], edges: Iterable[MergeEdge]) -> dict[int, str | int]:
    """Breadth-first from the seeds: pk -> OWN or the id of the link that first reached it.
    Edges are walked in link-id order, so the answer does not depend on query order."""
    adjacency: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for edge in sorted(edges, key=lambda e: e.link_id):
        adjacency[edge.a_patient_pk].append((edge.link_id, edge.b_patient_pk))
        adjacency[edge.b_patient_pk].append((edge.link_id, edge.a_patient_pk))
    via: dict[int, str | int] = {pk: OWN for pk in sorted(seeds)}
    queue = deque(sorted(seeds))
    while queue:
        pk = queue.popleft()
        for link_id, other in adjacency[pk]:
            if other not in via:
                via[other] = link_id
                queue.append(other)
    return via


def other_ids(store: LinkStore, patient_pks: Iterable[int]) -> dict[int, list[tuple[str, str]]]:
    """Patient pk -> the (patient_id, issuer) pairs of the person's other IDs, sorted.
    Three small reads: the transitive group, its confirmed links, its patient rows."""
    pks = set(patient_pks)
    if not pks:
        return {}
    group = store.linked_patients(pks)
    edges = store.merge_edges(group)
    if not edges:
        return {pk: [] for pk in pks}
    person = components(edges)
    records = store.patient_records(group)
    out = {}
    for pk in pks:
        others = person.get(pk, frozenset({pk})) - {pk}
        out[pk] = sorted((records[o].patient_id, records[o].issuer) for o in others if o in records)
    return out


# ----- priors ---------------------------------------------------------------------------

def seed_patients(store: LinkStore, patient_id: str | None = None, issuer: str | None = None,
                  study_uid: str | None = None) -> list[int]:
    """The patient rows asked for; PriorsError when none (or, without issuer, several) match."""
    if study_uid is not None:
        pk = store.patient_of_study(study_uid)
        if pk is None:
            raise PriorsError(f"no study with Study Instance UID {study_uid} is stored")
        return [pk]
    if not patient_id:
        raise PriorsError("give a Patient ID or a Study Instance UID", exit_code=2)
    pks = store.patient_pks(patient_id, issuer)
    if not pks:
        where = f" from issuer '{issuer}'" if issuer else ""
        raise PriorsError(f"no patient with Patient ID '{patient_id}'{where} is stored")
    if len(pks) > 1:
        # The same ID from two issuers is two patients (PS3.3 C.7.1.1): never guess.
        issuers = sorted(r.issuer or "(none)" for r in store.patient_records(pks).values())
        raise PriorsError(f"Patient ID '{patient_id}' exists under {len(pks)} issuers "
                          f"({', '.join(issuers)}): pass --issuer", exit_code=2)
    return pks


def demographics(patient: PatientRecord, studies: Iterable[StudyRecord]) -> dict:
    """Name, birth date and sex as the newest study of this ID that is not misfiled carried
    them. The patient row keeps the latest registration, which a misfiled study overwrites
    with someone else's name."""
    own = [s for s in studies if s.patient_pk == patient.patient_pk and s.misfiled_link is None]
    if not own:
        return {"name": patient.name, "birth_date": patient.birth_date, "sex": patient.sex}
    newest = max(own, key=lambda s: (s.study_date is not None, s.study_date or "", s.study_time or "", s.study_uid))
    return {"name": newest.patient_name, "birth_date": newest.birth_date, "sex": newest.sex}


def _study(record: StudyRecord, via) -> dict:
    return {"patient_id": record.patient_id, "issuer": record.issuer, "study_uid": record.study_uid,
            "date": record.study_date, "time": record.study_time, "accession_number": record.accession_number,
            "description": record.description, "modalities": list(record.modalities),
            "series_count": record.series_count, "via": via}


def study_order(record: StudyRecord) -> tuple:
    return (record.study_date is None, record.study_date or "", record.study_time or "", record.study_uid)


def priors(store: LinkStore, patient_id: str | None = None, issuer: str | None = None,
           study_uid: str | None = None) -> dict:
    seeds = seed_patients(store, patient_id, issuer, study_uid)
    group = store.linked_patients(seeds)
    via = reached_via(seeds, store.merge_edges(group))
    patients = store.patient_records(group)
    studies = sorted(store.find_studies(patient_pks=group), key=study_order)

    seed = patients[seeds[0]]
    timeline, misfiled = [], []
    for record in studies:
        entry = _study(record, via.get(record.patient_pk, OWN))
        if record.misfiled_link is not None:
            misfiled.append({**entry, "link_id": record.misfiled_link})
        else:
            timeline.append(entry)

    keys = {(p.patient_id, p.issuer) for p in patients.values()}
    open_links = []
    for view in store.list(status="open", patient_pks=group):
        ours, other = view.a, view.b
        if view.kind == "different_patient_same_id":
            ours, other = view.b, view.a       # `a` is the suspect study
        elif (view.a.patient_id, view.a.issuer) not in keys:
            ours, other = view.b, view.a
        open_links.append({"id": view.id, "kind": view.kind, "band": view.band,
                           "probability": round(view.probability, 4), "study_uid": ours.study_uid,
                           "other_patient_id": other.patient_id, "other_issuer": other.issuer,
                           "other_study_uid": other.study_uid})

    ids = sorted(({"patient_id": p.patient_id, "issuer": p.issuer, "via": via.get(pk, OWN)}
                  for pk, p in patients.items()), key=lambda i: (i["via"] != OWN, 0 if i["via"] == OWN else i["via"], i["patient_id"], i["issuer"]))
    return {
        "patient": {"patient_id": seed.patient_id, "issuer": seed.issuer, **demographics(seed, studies)},
        "ids": ids,
        "studies": timeline,
        "misfiled": misfiled,
        "open_links": open_links,
    }


def format_table(result: dict) -> str:
    """Human-readable priors: the timeline, then misfiled studies, then open links."""
    patient = result["patient"]
    issuer = f" ({patient['issuer']})" if patient["issuer"] else ""
    lines = [f"priors of {patient['patient_id']}{issuer}: {patient.get('name') or ''} "
             f"born {patient.get('birth_date') or '?'}".rstrip(),
             "ids: " + ", ".join(f"{i['patient_id']}{'@' + i['issuer'] if i['issuer'] else ''}"
                                 f" [{'own' if i['via'] == OWN else 'link ' + str(i['via'])}]"
                                 for i in result["ids"]), ""]

    def rows(studies, misfiled=False):
        out = [f"{'DATE':<8}  {'TIME':<6}  {'PATIENT ID':<16} {'ISSUER':<12} {'MOD':<8} {'SER':>3}  "
               f"{'FLAGGED' if misfiled else 'VIA':<8} {'STUDY UID':<64} DESCRIPTION"]
        for s in studies:
            via = "own" if s["via"] == OWN else f"link {s['via']}"
            if misfiled:
                via = f"link {s['link_id']}"
            out.append(f"{s['date'] or '-':<8}  {(s['time'] or '-')[:6]:<6}  {s['patient_id']:<16} "
                       f"{s['issuer'] or '-':<12} {','.join(s['modalities']) or '-':<8} {s['series_count']:>3}  "
                       f"{via:<8} {s['study_uid']:<64} {s['description'] or ''}".rstrip())
        return out

    lines += [f"studies ({len(result['studies'])}):"] + rows(result["studies"])
    if result["misfiled"]:
        lines += ["", f"misfiled, not this person's (confirmed links) ({len(result['misfiled'])}):"]
        lines += rows(result["misfiled"], misfiled=True)
    if result["open_links"]:
        lines += ["", f"open links, not yet decided ({len(result['open_links'])}):"]
        for link in result["open_links"]:
            other = link["other_patient_id"] + (f"@{link['other_issuer']}" if link["other_issuer"] else "")
            lines.append(f"  link {link['id']:<6} {link['kind']:<27} p={link['probability']:.3f}  "
                         f"{link['study_uid']} <-> {other} {link['other_study_uid']}")
    return "\n".join(lines) + "\n"
