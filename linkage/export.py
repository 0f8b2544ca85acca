"""Export confirmed identity decisions for the systems that own identity (RIS, MPI, PACS).

Merges (`--kind merges`, the default) are the confirmed same_patient_different_id links,
grouped into persons: links join IDs transitively, so A-B and B-C make one person {A,B,C}
with ONE surviving ID and one merge row / message per other ID.

Surviving ID, per person, the first of:
  1. an ID of `home_issuer` when one is given (the issuer whose register is the master);
  2. the ID whose earliest study is oldest (the oldest registration is usually the real
     record; a duplicate ID is typically created at a later visit);
  3. the ID this node registered first (lowest patient row id), which also settles IDs
     without dated studies.
Each merged ID is reported with the confirmed link that joined it on the shortest path from
the survivor (links taken in id order), so `link_id` points at the decision to audit.
Names, birth dates and sex are those the ID's newest non-misfiled study carried (the patient
row holds the latest registration, which a misfiled study may have overwritten).

CSV merges columns: MERGE_COLUMNS. HL7: one ADT^A40 (merge patient - patient identifier
list, v2.5, structure ADT_A39) per merged ID: MSH (sending application DICOM-NODE), EVN,
PID (surviving ID; PID-3 CX with the issuer as assigning authority and type PI; name,
birth date, sex), MRG (MRG-1 the prior ID and issuer, MRG-7 its name). v2.5 does not
require PV1 in ADT_A39, so none is sent. Framing: newline-separated messages without MLLP
or batch envelope: segments end with CR, each message is followed by LF, so a file splits
into messages on LF and into segments on CR. (hl7apy 1.3.5 cannot encode BHS-1/BHS-2, so a
batch envelope would have to be concatenated by hand.) An ID without issuer has no
assigning authority: the receiver applies its default.

Misfiled studies (`--kind misfiled`, CSV only) are the confirmed different_patient_same_id
links: one row per study that must be moved away from the Patient ID it is filed under
(MISFILED_COLUMNS). HL7 ADT has no message for moving one study, so these are CSV only.
"""

from __future__ import annotations

import csv
import io
import re
from collections import defaultdict, deque
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from db.links import LinkStore
from db.records_linkage import MergeEdge, PatientRecord
from linkage.priors import components, demographics

SENDING_APPLICATION = "DICOM-NODE"
HL7_VERSION = "2.5"

MERGE_COLUMNS = ["link_id", "surviving_patient_id", "surviving_issuer", "surviving_name", "surviving_birth_date",
                 "merged_patient_id", "merged_issuer", "merged_name", "merged_birth_date",
                 "decided_by", "decided_at", "probability", "person_size"]
MISFILED_COLUMNS = ["link_id", "study_uid", "accession_number", "study_date", "filed_patient_id", "filed_issuer",
                    "study_patient_name", "study_birth_date", "compared_study_uid", "compared_patient_name",
                    "compared_birth_date", "decided_by", "decided_at", "probability", "note"]


@dataclass(frozen=True)
class Merge:
    survivor: PatientRecord
    merged: PatientRecord
    link: MergeEdge              # the confirmed link that joined `merged` on the path from the survivor
    person_size: int


def survivor_rank(record: PatientRecord, home_issuer: str | None) -> tuple:
    """Sort key: the smallest wins (rule in the module docstring)."""
    home = 0 if home_issuer is not None and record.issuer == home_issuer else 1
    return (home, record.first_study_date is None, record.first_study_date or "", record.patient_pk)


def merges(store: LinkStore, home_issuer: str | None = None) -> list[Merge]:
    edges = store.merge_edges()
    if not edges:
        return []
    person = components(edges)
    studies = store.find_studies(patient_pks=set(person))
    # Names and birth dates as each ID's own (not misfiled) studies carried them.
    records = {pk: replace(r, **demographics(r, studies)) for pk, r in store.patient_records(set(person)).items()}
    adjacency: dict[int, list[MergeEdge]] = defaultdict(list)
    for edge in sorted(edges, key=lambda e: e.link_id):
        adjacency[edge.a_patient_pk].append(edge)
        adjacency[edge.b_patient_pk].append(edge)
    out = []
    for group in {frozenset(g) for g in person.values()}:
        survivor = min((records[pk] for pk in group), key=lambda r: survivor_rank(r, home_issuer))
        # Breadth-first from the survivor: each other ID with the link that reached it.
        seen, queue = {survivor.patient_pk}, deque([survivor.patient_pk])
        while queue:
            pk = queue.popleft()
            for edge in adjacency[pk]:
                other = edge.b_patient_pk if edge.a_patient_pk == pk else edge.a_patient_pk
                if other not in seen:
                    seen.add(other)
                    queue.append(other)
                    out.append(Merge(survivor, records[other], edge, len(group)))
    return sorted(out, key=lambda m: (m.survivor.patient_id, m.survivor.issuer, m.merged.patient_id,
                                      m.merged.issuer))


# ----- CSV ------------------------------------------------------------------------------

def merges_csv(rows: list[Merge]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, MERGE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for m in rows:
        writer.writerow({
            "link_id": m.link.link_id,
            "surviving_patient_id": m.survivor.patient_id, "surviving_issuer": m.survivor.issuer,
            "surviving_name": m.survivor.name or "", "surviving_birth_date": m.survivor.birth_date or "",
            "merged_patient_id": m.merged.patient_id, "merged_issuer": m.merged.issuer,
            "merged_name": m.merged.name or "", "merged_birth_date": m.merged.birth_date or "",
            "decided_by": m.link.decided_by or "", "decided_at": m.link.decided_at or "",
            "probability": f"{m.link.probability:.4f}", "person_size": m.person_size,
        })
    return buffer.getvalue()


def misfiled_csv(store: LinkStore) -> str:
    views = sorted(store.list(status="confirmed", kind="different_patient_same_id"), key=lambda v: v.id)
    studies = {s.study_uid: s for s in store.find_studies(study_uids=[v.a.study_uid for v in views])} if views else {}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, MISFILED_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for v in views:
        study = studies.get(v.a.study_uid)
        writer.writerow({
            "link_id": v.id, "study_uid": v.a.study_uid,
            "accession_number": (study.accession_number if study else None) or "",
            "study_date": v.a.study_date or "", "filed_patient_id": v.a.patient_id, "filed_issuer": v.a.issuer,
            "study_patient_name": v.a.name or "", "study_birth_date": v.a.birth_date or "",
            "compared_study_uid": v.b.study_uid, "compared_patient_name": v.b.name or "",
            "compared_birth_date": v.b.birth_date or "", "decided_by": v.decided_by or "",
            "decided_at": v.decided_at or "", "probability": f"{v.probability:.4f}", "note": v.note or "",
        })
    return buffer.getvalue()


# ----- HL7 v2.5 ADT^A40 -----------------------------------------------------------------

def _ts(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y%m%d%H%M%S+0000")


def _set_cx(field, patient_id: str, issuer: str) -> None:
    # Values go in as hl7apy datatype objects, which escape ^ & ~ \ |; a plain string would
    # be parsed as ER7 and an ID containing a separator would corrupt the field.
    from hl7apy.v2_5 import ID, IS, ST

    field.cx_1 = ST(patient_id)
    if issuer:
        field.cx_4.hd_1 = IS(issuer)
    field.cx_5 = ID("PI")


def _set_xpn(field, dicom_name: str | None) -> None:
    """DICOM PN family^given^middle^prefix^suffix -> XPN family^given^middle^suffix^prefix."""
    from hl7apy.v2_5 import ST

    if not dicom_name:
        return
    parts = (dicom_name.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (p.strip() for p in parts)
    if family:
        field.xpn_1.fn_1 = ST(family)
    for component, value in (("xpn_2", given), ("xpn_3", middle), ("xpn_4", suffix), ("xpn_5", prefix)):
        if value:
            setattr(field, component, ST(value))


def a40_message(merge: Merge, control_id: str, now: datetime):
    from hl7apy.core import Message
    from hl7apy.v2_5 import ID, IS

    msg = Message("ADT_A39", version=HL7_VERSION)
    msg.msh.msh_3.hd_1 = IS(SENDING_APPLICATION)
    msg.msh.msh_7 = _ts(now)
    msg.msh.msh_9 = "ADT^A40^ADT_A39"
    msg.msh.msh_10 = control_id
    msg.msh.msh_11 = "P"
    msg.msh.msh_12 = HL7_VERSION
    msg.evn.evn_1 = ID("A40")
    msg.evn.evn_2 = _ts(now)
    if merge.link.decided_at:
        # When the archivist confirmed the link: the real-world moment of the merge decision.
        msg.evn.evn_6 = _ts(datetime.fromisoformat(merge.link.decided_at))
    patient = msg.add_group("ADT_A39_PATIENT")
    survivor, merged = merge.survivor, merge.merged
    _set_cx(patient.pid.pid_3, survivor.patient_id, survivor.issuer)
    _set_xpn(patient.pid.pid_5, survivor.name)
    if survivor.birth_date and re.fullmatch(r"\d{8}", survivor.birth_date):
        patient.pid.pid_7 = survivor.birth_date     # DICOM DA YYYYMMDD is a valid HL7 TS
    if survivor.sex:
        patient.pid.pid_8 = IS(survivor.sex if survivor.sex in ("M", "F", "O") else "U")
    _set_cx(patient.mrg.mrg_1, merged.patient_id, merged.issuer)
    _set_xpn(patient.mrg.mrg_7, merged.name)
    return msg


def merges_hl7(rows: list[Merge], now: datetime | None = None) -> str:
    """Newline-separated ER7 messages (CR between segments, CR LF after each message)."""
    now = now or datetime.now(timezone.utc)
    stamp = now.astimezone(timezone.utc).strftime("%Y%m%d%H%M%S")
    # MSH-10 is ST(20): the export time plus a sequence number, unique per export run.
    return "".join(a40_message(m, f"{stamp}-{n}", now).to_er7() + "\r\n" for n, m in enumerate(rows, 1))
