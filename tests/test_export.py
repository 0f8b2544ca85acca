"""`dicom-node export`: confirmed merges as CSV and HL7 v2.5 ADT^A40 (parsed back with hl7apy),
confirmed misfiled studies as CSV; SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timezone

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from db.links import LinkStore
from dicom_node.cli import main
from linkage.export import MERGE_COLUMNS, MISFILED_COLUMNS, merges, merges_csv, merges_hl7, misfiled_csv
from tests.helpers import node_config, write_toml
from tests.test_priors import MISFILED, SAME, add_link, add_study


@pytest.fixture
def links(store) -> LinkStore:
    return LinkStore(store.engine)


@pytest.fixture
def decided(store, links):
    """Person 1: A1@HOSP-A (oldest study) - B1@HOSP-B - C1 (no issuer), joined by two confirmed links.
    Person 2: X@HOSP-A - Y@HOSP-B, Y has the oldest study. Plus an open, a rejected and a misfiled link."""
    s = {
        "a1": add_study(store, "A1", "HOSP-A", name="DOE^JANE", birth="19700101", sex="F", date="20150101"),
        "b1": add_study(store, "B1", "HOSP-B", name="DOE^JANE^M", birth="19700101", sex="F", date="20180101"),
        "c1": add_study(store, "C1", "", name="DOE^J", birth="19700101", sex="F", date="20200101"),
        "x": add_study(store, "X", "HOSP-A", name="ROE^RICHARD", birth="19550505", sex="M", date="20210101"),
        "y": add_study(store, "Y", "HOSP-B", name="ROE^RICHARD", birth="19550505", sex="M", date="20100101"),
        "open": add_study(store, "O1", "HOSP-C", name="DOE^JANE", birth="19700101", date="20220101"),
        "rej": add_study(store, "R1", "HOSP-C", name="DOE^JANE", birth="19700101", date="20230101"),
        "wrong": add_study(store, "A1", "HOSP-A", name="SMITH^ANNA", birth="19900909", date="20240101",
                           accession="ACC42"),
    }
    ids = {
        "ab": add_link(links, SAME, s["b1"], s["a1"], 0.97),
        "bc": add_link(links, SAME, s["c1"], s["b1"], 0.91),
        "xy": add_link(links, SAME, s["x"], s["y"], 0.88),
        "open": add_link(links, SAME, s["open"], s["a1"], 0.7, decision=None),
        "rej": add_link(links, SAME, s["rej"], s["a1"], 0.6, decision="reject"),
        "wrong": add_link(links, MISFILED, s["wrong"], s["a1"], 0.99),
    }
    return s, ids


def rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_csv_one_row_per_merged_id_one_survivor_per_person(links, decided):
    s, ids = decided
    out = rows(merges_csv(merges(links)))
    assert list(out[0]) == MERGE_COLUMNS
    pairs = [(r["surviving_patient_id"], r["surviving_issuer"], r["merged_patient_id"], r["merged_issuer"],
              int(r["link_id"])) for r in out]
    # Oldest study survives: A1 for person 1 (C1 joined through B1, so via the B-C link), Y for person 2.
    assert pairs == [("A1", "HOSP-A", "B1", "HOSP-B", ids["ab"]), ("A1", "HOSP-A", "C1", "", ids["bc"]),
                     ("Y", "HOSP-B", "X", "HOSP-A", ids["xy"])]
    first = out[0]
    # A1's name is its own study's, not the misfiled SMITH^ANNA that arrived last under A1.
    assert first["surviving_name"] == "DOE^JANE" and first["merged_name"] == "DOE^JANE^M"
    assert first["surviving_birth_date"] == first["merged_birth_date"] == "19700101"
    assert first["decided_by"] == "archivist"
    assert abs(datetime.fromisoformat(first["decided_at"]) - datetime.now(timezone.utc)).total_seconds() < 300
    assert first["probability"] == "0.9700" and first["person_size"] == "3"
    merged = {r["merged_patient_id"] for r in out}
    assert not merged & {"O1", "R1"}, "open and rejected links are never exported"


def test_home_issuer_decides_the_survivor(links, decided):
    s, ids = decided
    pairs = [(m.survivor.patient_id, m.merged.patient_id, m.link.link_id) for m in merges(links, home_issuer="HOSP-B")]
    assert pairs == [("B1", "A1", ids["ab"]), ("B1", "C1", ids["bc"]), ("Y", "X", ids["xy"])]


def test_hl7_a40_messages_parse_back(links, decided):
    s, ids = decided
    now = datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
    text = merges_hl7(merges(links), now)
    blocks = text.split("\n")
    assert blocks[-1] == "" and all(b.endswith("\r") for b in blocks[:-1])
    messages = [parse_message(b.rstrip("\r"), find_groups=True, validation_level=VALIDATION_LEVEL.STRICT)
                for b in blocks[:-1]]
    assert len(messages) == 3
    for msg in messages:
        assert msg.validate()
        assert msg.msh.msh_3.to_er7() == "DICOM-NODE"
        assert msg.msh.msh_9.to_er7() == "ADT^A40^ADT_A39" and msg.msh.msh_12.to_er7() == "2.5"
        assert msg.msh.msh_7.to_er7() == "20260304050607+0000" and msg.evn.evn_2.to_er7() == "20260304050607+0000"
        assert msg.evn.evn_1.to_er7() == "A40"
    assert len({m.msh.msh_10.to_er7() for m in messages}) == 3

    def ids_of(msg):
        group = msg.adt_a39_patient
        return (group.pid.pid_3.cx_1.to_er7(), group.pid.pid_3.cx_4.to_er7(), group.pid.pid_3.cx_5.to_er7(),
                group.mrg.mrg_1.cx_1.to_er7(), group.mrg.mrg_1.cx_4.to_er7())

    assert [ids_of(m) for m in messages] == [("A1", "HOSP-A", "PI", "B1", "HOSP-B"), ("A1", "HOSP-A", "PI", "C1", ""),
                                             ("Y", "HOSP-B", "PI", "X", "HOSP-A")]
    first = messages[0].adt_a39_patient
    assert first.pid.pid_5.to_er7() == "DOE^JANE" and first.pid.pid_7.to_er7() == "19700101"
    assert first.pid.pid_8.to_er7() == "F" and first.mrg.mrg_7.to_er7() == "DOE^JANE^M"


def test_hl7_escapes_separators_in_identifiers(store, links):
    a = add_study(store, "A^1&2", "HOSP|A", name="O'NEIL^ANN", date="20100101")
    b = add_study(store, "B~1", "", name="O'NEIL^ANN", date="20200101")
    add_link(links, SAME, a, b)
    (block, _) = merges_hl7(merges(links)).split("\n")
    msg = parse_message(block.rstrip("\r"), find_groups=True)
    pid3 = msg.adt_a39_patient.pid.pid_3
    # Still one ID, authority and type: the separators were escaped, not interpreted.
    assert pid3.cx_1.to_er7() == r"A\S\1\T\2" and pid3.cx_4.to_er7() == r"HOSP\F\A" and pid3.cx_5.to_er7() == "PI"
    assert msg.adt_a39_patient.mrg.mrg_1.cx_1.to_er7() == r"B\R\1"


def test_misfiled_csv_lists_confirmed_wrong_patient_studies(links, decided):
    s, ids = decided
    out = rows(misfiled_csv(links))
    assert list(out[0]) == MISFILED_COLUMNS
    assert [(r["link_id"], r["study_uid"], r["filed_patient_id"], r["filed_issuer"], r["accession_number"],
             r["study_patient_name"], r["compared_study_uid"]) for r in out] == [
        (str(ids["wrong"]), s["wrong"], "A1", "HOSP-A", "ACC42", "SMITH^ANNA", s["a1"])]
    links.review(ids["wrong"], "reject", actor="archivist")
    assert rows(misfiled_csv(links)) == []


def test_cli_writes_files_and_refuses_hl7_for_misfiled(tmp_path, db_url, store, decided, capsys):
    config = str(write_toml(tmp_path / "node.toml", node_config(tmp_path, db_url)))
    out = tmp_path / "merges.hl7"
    assert main(["--config", config, "export", "--format", "hl7", "--out", str(out)]) == 0
    assert "exported 3 merges" in capsys.readouterr().out
    data = out.read_bytes()
    assert data.count(b"MSH|") == 3 and data.count(b"\r\n") == 3 and b"\rMRG|" in data

    assert main(["--config", config, "export", "--format", "csv"]) == 0
    assert len(rows(capsys.readouterr().out)) == 3
    assert main(["--config", config, "export", "--format", "csv", "--kind", "misfiled"]) == 0
    assert len(rows(capsys.readouterr().out)) == 1
    assert main(["--config", config, "export", "--format", "hl7", "--kind", "misfiled"]) == 2
    assert "CSV only" in capsys.readouterr().err
