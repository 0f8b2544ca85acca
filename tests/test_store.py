"""The identity store on SQLite and PostgreSQL: rows, series states, races, counts."""

from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.migrate import current_revision, head_revision
from db.models import Instance, Patient, Series, SeriesState, Study
from db.records import InstanceHeader, PatientKey, Received, StoredFile
from db.store import utcnow


def received(sop: str, series: str = "1.2.3.1", study: str = "1.2.3", patient: str = "P1",
             issuer: str = "", at=None, size: int = 100) -> Received:
    header = InstanceHeader(patient=PatientKey(patient, issuer), study_uid=study, series_uid=series,
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=sop,
                            modality="CT", patient_name="Doe^John")
    stored = StoredFile(path=f"{study}/{series}/{sop}.dcm", size=size, sha256="0" * 64,
                        transfer_syntax_uid="1.2.840.10008.1.2.1")
    return Received(header, stored, "TESTSCU", at or utcnow())


def series_row(store, uid: str) -> Series:
    with Session(store.engine) as session:
        return session.scalars(select(Series).where(Series.series_uid == uid)).one()


def test_migrations_bring_an_empty_database_to_head(store):
    assert current_revision(store.engine) == head_revision() is not None


def test_instances_build_patient_study_series_with_counts(store):
    for n in range(3):
        store.record_instance(received(f"1.2.3.1.{n}", size=1000))
    store.record_instance(received("1.2.3.2.1", series="1.2.3.2", size=10))
    counts = store.counts()
    assert counts["patients"] == 1 and counts["studies"] == 1 and counts["instances"] == 4
    assert counts["series"]["receiving"] == 2 and counts["bytes"] == 3010
    first = series_row(store, "1.2.3.1")
    assert (first.instance_count, first.total_bytes) == (3, 3000)


def test_quiet_series_become_stable_and_a_late_instance_reopens_them(store):
    old = utcnow() - timedelta(seconds=120)
    store.record_instance(received("1.1", series="9.1", at=old))
    store.record_instance(received("2.1", series="9.2"))  # still arriving
    assert store.mark_stable(utcnow() - timedelta(seconds=30)) == 1
    assert series_row(store, "9.1").state == SeriesState.stable
    assert series_row(store, "9.2").state == SeriesState.receiving
    assert store.mark_stable(utcnow() - timedelta(seconds=30)) == 0  # idempotent

    store.record_instance(received("1.2", series="9.1"))
    reopened = series_row(store, "9.1")
    assert reopened.state == SeriesState.receiving and reopened.instance_count == 2


def test_concurrent_first_instances_of_one_study_do_not_collide(store):
    errors = []

    def send(n: int) -> None:
        try:
            store.record_instance(received(f"5.5.{n}", series=f"5.{n % 2}", study="5", patient="RACE"))
        except Exception as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with Session(store.engine) as session:
        assert session.scalar(select(Patient.id).where(Patient.patient_id == "RACE")) is not None
        assert len(session.scalars(select(Study)).all()) == 1
        assert len(session.scalars(select(Series)).all()) == 2
        assert len(session.scalars(select(Instance)).all()) == 8
    assert series_row(store, "5.0").instance_count + series_row(store, "5.1").instance_count == 8


def test_study_arriving_under_a_second_patient_id_is_counted_not_moved(store):
    store.record_instance(received("7.1", study="7", series="7.0", patient="A"))
    store.record_instance(received("7.2", study="7", series="7.0", patient="B"))
    with Session(store.engine) as session:
        study = session.scalars(select(Study)).one()
        assert study.patient.patient_id == "A" and study.conflicting_instances == 1
        assert {p.patient_id for p in session.scalars(select(Patient))} == {"A", "B"}
