"""The linkage engine over a real store (SQLite and PostgreSQL): flags, updates, reviews, audit."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta

import numpy as np
import pytest

from db.links import LinkError, LinkStore
from db.queue import WorkQueue
from db.records import EmbeddingResult, InstanceHeader, PatientKey, Received, RouteDecision, StoredFile
from db.store import utcnow
from linkage import decide as D
from linkage.engine import Calibration, LinkageEngine
from tests.helpers import node_config, write_toml

DIM = 16
MODEL = ("chest_xr", "test-net", "1")
CENTRES = np.linalg.qr(np.random.default_rng(0).normal(size=(DIM, DIM)))[0][:6]   # orthonormal persons

# study uid, patient id, issuer, name, birth date, sex, study date, person (image identity)
COHORT = [
    ("1.1", "A100", "SITE-A", "DOE^JANE", "19800315", "F", "20200101", 0),
    ("1.2", "A100", "SITE-A", "DOE^JANE", "19800315", "F", "20210101", 0),
    ("1.3", "B200", "SITE-B", "DOE^JAEN", "19800315", "F", "20220101", 0),   # same person, 2nd site
    ("2.1", "A300", "SITE-A", "SMITH^PETER", "19551201", "M", "20190101", 1),
    ("2.2", "A300", "SITE-A", "SMITH^PETER", "19551201", "M", "20200601", 1),
    ("2.3", "A300", "SITE-A", "SMITH^PETER", "19551201", "M", "20210601", 1),
    ("2.4", "A300", "SITE-A", "SMITH^PETER", "19551201", "M", "20220601", 2),  # misfiled: person 2
    ("3.1", "A400", "SITE-A", "DOE^ANNA", "19800315", "F", "20200301", 3),    # twin of DOE^JANE
    ("3.2", "A400", "SITE-A", "DOE^ANNA", "19800315", "F", "20210301", 3),
]


def header(study, pid, issuer, name, birth, sex, date, sop):
    return InstanceHeader(PatientKey(pid, issuer), study, study + ".1", "1.2.840.10008.5.1.4.1.1.1", sop,
                          patient_name=name, birth_date=birth, sex=sex, study_date=date, modality="CR")


def load_cohort(store, rows=COHORT, seed=1) -> None:
    rng = np.random.default_rng(seed)
    old = utcnow() - timedelta(minutes=5)
    person_of = {}
    for study, pid, issuer, name, birth, sex, date, person in rows:
        sop = study + ".1.1"
        stored = StoredFile(f"{study}/{sop}.dcm", 10, "0" * 64, "1.2.840.10008.1.2.1")
        store.record_instance(Received(header(study, pid, issuer, name, birth, sex, date, sop), stored, "T", old))
        person_of[study + ".1"] = person
    store.mark_stable(utcnow())
    queue = WorkQueue(store.engine)
    for work in queue.claim(100):
        v = CENTRES[person_of[work.series_uid]] + rng.normal(scale=0.05, size=DIM)
        v = (v / np.linalg.norm(v)).astype("<f4")
        queue.complete(work, RouteDecision("chest_xr", 0.99, "header"),
                       EmbeddingResult(*MODEL, v.tobytes(), DIM))


def engine_for(store, tmp_path, calibrated=True) -> LinkageEngine:
    cal = {MODEL: Calibration(a=20.0, b=-10.0)} if calibrated else {}
    return LinkageEngine(LinkStore(store.engine), D.Thresholds(), cal, candidates=5, index_dir=tmp_path / "index")


def by_kind(links):
    out = {}
    for link in links:
        out.setdefault(link.kind, []).append(link)
    return out


def test_flags_the_duplicate_and_the_misfiled_study_and_nothing_else(store, tmp_path):
    load_cohort(store)
    stats = engine_for(store, tmp_path).link_pending()
    assert stats.series == 9 and stats.errors == 0
    links = by_kind(LinkStore(store.engine).list())
    same, misfiled = links.get(D.SAME, []), links.get(D.MISFILED, [])
    assert [{l.a.patient_id, l.b.patient_id} for l in same] == [{"A100", "B200"}]
    assert same[0].band == "confident" and same[0].evidence["fields"]["name"]["level"] == "close"
    assert same[0].evidence["image"]["chest_xr"]["weight"] > 0
    assert [l.a.study_uid for l in misfiled] == ["2.4"]
    assert misfiled[0].a.patient_id == misfiled[0].b.patient_id == "A300"
    assert misfiled[0].a.series_uids == ["2.4.1"]
    # the twins share family name, birth date and sex, but not their images
    assert not any({"A400"} & {l.a.patient_id, l.b.patient_id} for l in same)
    assert LinkStore(store.engine).pending_series() == []


def test_without_calibration_images_do_not_count(store, tmp_path):
    load_cohort(store)
    engine_for(store, tmp_path, calibrated=False).link_pending()
    links = by_kind(LinkStore(store.engine).list())
    # the duplicate is still found by its demographics; the misfiled study (same demographics) is not
    assert len(links.get(D.SAME, [])) == 1 and D.MISFILED not in links
    assert "calibration" in links[D.SAME][0].evidence["image"]["chest_xr"]["note"]


def test_new_evidence_updates_instead_of_duplicating(store, tmp_path):
    links = LinkStore(store.engine)
    load_cohort(store, COHORT[:3])
    engine_for(store, tmp_path).link_pending()
    first = links.list()
    assert len(first) == 1
    load_cohort(store, [("1.4", "B200", "SITE-B", "DOE^JANE", "19800315", "F", "20230101", 0)], seed=2)
    engine_for(store, tmp_path).link_pending()
    again = links.list()
    assert [l.id for l in again] == [first[0].id]
    assert again[0].evidence["studies_compared"] == [2, 2]
    actions = [e.action for e in links.events(first[0].id)][::-1]     # newest first
    assert actions[0] == "created" and set(actions[1:]) <= {"updated"}


def test_reviews_are_audited_reversible_and_kept_against_new_evidence(store, tmp_path):
    links = LinkStore(store.engine)
    load_cohort(store)
    engine_for(store, tmp_path).link_pending()
    link = links.list(kind=D.SAME)[0]
    assert links.review(link.id, "confirm", "archivist1", "same DOB, typo").status == "confirmed"
    with pytest.raises(LinkError, match="already confirmed"):
        links.review(link.id, "confirm", "archivist1")
    with pytest.raises(LinkError, match="who decided"):
        links.review(link.id, "reject", " ")
    with pytest.raises(LinkError, match="no link"):
        links.review(9999, "reject", "x")
    # evidence arriving later does not undo a decision
    load_cohort(store, [("1.5", "B200", "SITE-B", "DOE^JANE", "19800315", "F", "20240101", 0)], seed=3)
    engine_for(store, tmp_path).link_pending()
    assert links.get(link.id).status == "confirmed"
    assert links.linked_patients(links.patient_pks("A100")) == set(links.patient_pks("A100") + links.patient_pks("B200"))
    links.review(link.id, "reopen", "archivist2", "wrong click")
    links.review(link.id, "reject", "archivist2", "different person")
    events = links.events(link.id)[::-1]
    assert [(e.action, e.actor) for e in events if e.actor != "linkage"] == [
        ("confirmed", "archivist1"), ("reopened", "archivist2"), ("rejected", "archivist2")]
    assert events[-1].note == "different person" and events[-1].from_status == "open"
    assert links.linked_patients(links.patient_pks("A100")) == set(links.patient_pks("A100"))


def test_index_is_saved_and_a_damaged_one_is_rebuilt(store, tmp_path):
    load_cohort(store)
    engine = engine_for(store, tmp_path)
    engine.link_pending()
    engine.save_index(force=True)
    assert any((tmp_path / "index").iterdir())
    reloaded = engine_for(store, tmp_path)
    assert len(reloaded.index) == 9 and reloaded.catch_up() == 0
    for path in (tmp_path / "index").iterdir():
        path.write_bytes(b"garbage")
    rebuilt = engine_for(store, tmp_path)
    assert rebuilt.catch_up() == 9


def test_links_and_review_commands(tmp_path):
    from db.engine import make_engine
    from db.migrate import upgrade
    from db.store import IdentityStore

    config = node_config(tmp_path)
    path = write_toml(tmp_path / "node.toml", config)
    from dicom_node.config import load_settings
    engine = make_engine(load_settings(path).database_url)
    upgrade(engine)
    store = IdentityStore(engine)
    load_cohort(store)
    engine_for(store, tmp_path).link_pending()

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "dicom_node", "--config", str(path), *args],
                              capture_output=True, text=True, timeout=120)

    listed = cli("links", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    items = json.loads(listed.stdout)
    assert {i["kind"] for i in items} == {D.SAME, D.MISFILED}
    for item in items:
        assert {"id", "kind", "status", "probability", "weight", "a", "b", "evidence"} <= set(item)
        assert {"patient_id", "issuer", "study_uid", "series_uids"} <= set(item["a"])
    target = next(i for i in items if i["kind"] == D.SAME)
    done = cli("review", str(target["id"]), "--confirm", "--by", "alice", "--note", "checked")
    assert done.returncode == 0 and "confirmed" in done.stdout
    assert [i["id"] for i in json.loads(cli("links", "--status", "confirmed", "--format", "json").stdout)] == [target["id"]]
    assert target["id"] not in [i["id"] for i in json.loads(cli("links", "--format", "json").stdout)]
    assert cli("review", str(target["id"]), "--confirm").returncode == 1
    table = cli("links", "--status", "all")
    assert "A300" in table.stdout and "2 link(s)" in table.stdout
    rows = cli("links", "--status", "all", "--format", "csv").stdout.splitlines()
    assert rows[0].startswith("id,kind,status") and len(rows) == 3
    # the confirmed review re-estimated the m/u weights
    assert LinkStore(engine).match_weights()
