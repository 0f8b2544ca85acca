"""`dicom-node priors`: a person's timeline across IDs joined by confirmed links, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from pydicom.uid import generate_uid

from db.links import LinkStore
from db.records import InstanceHeader, PatientKey, Received, StoredFile
from db.records_linkage import LinkDraft
from dicom_node.cli import main
from linkage.priors import OWN, PriorsError, priors
from tests.helpers import node_config, write_toml

SAME = "same_patient_different_id"
MISFILED = "different_patient_same_id"


# ----- seeding helpers (also used by tests/test_export.py) ------------------------------

def add_study(store, patient_id: str, issuer: str = "", *, name: str | None = None, birth: str | None = None,
              sex: str | None = None, date: str | None = None, time: str | None = None,
              accession: str | None = None, description: str | None = None, modalities=("CR",)) -> str:
    """One study, one single-instance series per modality, recorded as ingest would."""
    study_uid = generate_uid()
    for number, modality in enumerate(modalities, 1):
        header = InstanceHeader(
            patient=PatientKey(patient_id, issuer), study_uid=study_uid, series_uid=generate_uid(),
            sop_class_uid="1.2.840.10008.5.1.4.1.1.7", sop_instance_uid=generate_uid(), patient_name=name,
            birth_date=birth, sex=sex, study_date=date, study_time=time, accession_number=accession,
            study_description=description, modality=modality, series_number=number, instance_number=1)
        stored = StoredFile(path=f"x/{header.sop_instance_uid}.dcm", size=100, sha256="0" * 64,
                            transfer_syntax_uid="1.2.840.10008.1.2.1")
        store.record_instance(Received(header, stored, "TESTSCU", datetime.now(timezone.utc)))
    return study_uid


def add_link(links: LinkStore, kind: str, a_study: str, b_study: str, probability: float = 0.9,
             decision: str | None = "confirm", band: str = "review") -> int:
    studies = {s.study_uid: s for s in links.find_studies(study_uids=[a_study, b_study])}
    a, b = studies[a_study], studies[b_study]
    link_id, state = links.upsert(LinkDraft(
        key=f"{kind}:{a.study_pk}:{b.study_pk}", kind=kind, a_study_pk=a.study_pk, b_study_pk=b.study_pk,
        a_patient_pk=a.patient_pk, b_patient_pk=b.patient_pk, probability=probability, weight=3.0, band=band))
    assert state == "created"
    if decision:
        links.review(link_id, decision, actor="archivist", note="checked by hand")
    return link_id


@pytest.fixture
def links(store) -> LinkStore:
    return LinkStore(store.engine)


@pytest.fixture
def person(store, links):
    """One person under three IDs (P1 at HOSP-A, P2 at HOSP-B via link 1, P3 via P2 and link 2),
    a misfiled study under P1, an open link to P9, a rejected link to P8, and a stranger P7."""
    s = {}
    s["p1_2019"] = add_study(store, "P1", "HOSP-A", name="DOE^JANE", birth="19700101", sex="F",
                             date="20190310", time="090000", description="chest", modalities=("CR",))
    s["p1_2021"] = add_study(store, "P1", "HOSP-A", name="DOE^JANE", birth="19700101", sex="F",
                             date="20210101", time="080000", modalities=("CT", "SR"))
    s["p2_2020b"] = add_study(store, "P2", "HOSP-B", name="DOE^JANE", birth="19700101",
                              date="20200505", time="120000", modalities=("MR",))
    s["p2_2020a"] = add_study(store, "P2", "HOSP-B", name="DOE^JANE", birth="19700101",
                              date="20200505", time="070000", modalities=("CR",))
    s["p3_2018"] = add_study(store, "P3", "", name="DOE^JANE", birth="19700101", date="20180101", modalities=("DX",))
    s["p3_undated"] = add_study(store, "P3", "", name="DOE^JANE", birth="19700101", modalities=("OT",))
    s["p1_wrong"] = add_study(store, "P1", "HOSP-A", name="ROE^RICHARD", birth="19550505",
                              date="20200101", modalities=("CR",))
    s["p9"] = add_study(store, "P9", "HOSP-C", name="DOE^J", birth="19700101", date="20220202")
    s["p8"] = add_study(store, "P8", "HOSP-C", name="DOE^JANE", birth="19700101", date="20230303")
    s["p7"] = add_study(store, "P7", "HOSP-A", name="SMITH^JOHN", birth="19800101", date="20200101")
    ids = {
        "p1_p2": add_link(links, SAME, s["p1_2019"], s["p2_2020a"], 0.97),
        "p2_p3": add_link(links, SAME, s["p3_2018"], s["p2_2020b"], 0.95),
        "wrong": add_link(links, MISFILED, s["p1_wrong"], s["p1_2019"], 0.99),
        "open": add_link(links, SAME, s["p9"], s["p1_2021"], 0.7, decision=None),
        "rejected": add_link(links, SAME, s["p1_2021"], s["p8"], 0.6, decision="reject"),
    }
    return s, ids


def test_timeline_joins_confirmed_ids_transitively_in_date_order(links, person):
    s, ids = person
    result = priors(links, patient_id="P1", issuer="HOSP-A")

    assert [x["study_uid"] for x in result["studies"]] == [
        s["p3_2018"], s["p1_2019"], s["p2_2020a"], s["p2_2020b"], s["p1_2021"], s["p3_undated"]]
    by_uid = {x["study_uid"]: x for x in result["studies"]}
    assert by_uid[s["p1_2019"]]["via"] == OWN
    assert by_uid[s["p2_2020a"]]["via"] == ids["p1_p2"]
    # P3 joined through P2: the link that reached P3 is the P2-P3 one.
    assert by_uid[s["p3_2018"]]["via"] == ids["p2_p3"]
    assert by_uid[s["p1_2021"]]["modalities"] == ["CT", "SR"] and by_uid[s["p1_2021"]]["series_count"] == 2
    assert by_uid[s["p1_2019"]]["description"] == "chest" and by_uid[s["p2_2020a"]]["issuer"] == "HOSP-B"
    assert result["ids"] == [{"patient_id": "P1", "issuer": "HOSP-A", "via": OWN},
                             {"patient_id": "P2", "issuer": "HOSP-B", "via": ids["p1_p2"]},
                             {"patient_id": "P3", "issuer": "", "via": ids["p2_p3"]}]
    assert result["patient"]["name"] == "DOE^JANE"


def test_misfiled_and_open_links_are_listed_apart_never_in_the_timeline(links, person):
    s, ids = person
    result = priors(links, patient_id="P1", issuer="HOSP-A")
    timeline = {x["study_uid"] for x in result["studies"]}

    assert s["p1_wrong"] not in timeline
    assert [(m["study_uid"], m["link_id"], m["patient_id"]) for m in result["misfiled"]] == [
        (s["p1_wrong"], ids["wrong"], "P1")]
    # The open link is reported with the other side; its study is not a prior. Rejected links vanish.
    assert s["p9"] not in timeline and s["p8"] not in timeline
    assert result["open_links"] == [{
        "id": ids["open"], "kind": SAME, "band": "review", "probability": 0.7, "study_uid": s["p1_2021"],
        "other_patient_id": "P9", "other_issuer": "HOSP-C", "other_study_uid": s["p9"]}]
    assert all(link["id"] != ids["rejected"] for link in result["open_links"])


def test_same_person_from_any_of_its_ids_or_a_study_uid(links, person):
    s, ids = person
    from_p3 = priors(links, patient_id="P3", issuer="")
    from_study = priors(links, study_uid=s["p2_2020b"])
    reference = [x["study_uid"] for x in priors(links, patient_id="P1", issuer="HOSP-A")["studies"]]
    assert [x["study_uid"] for x in from_p3["studies"]] == reference
    assert [x["study_uid"] for x in from_study["studies"]] == reference
    by_uid = {x["study_uid"]: x["via"] for x in from_p3["studies"]}
    assert by_uid[s["p3_2018"]] == OWN and by_uid[s["p2_2020a"]] == ids["p2_p3"]
    assert by_uid[s["p1_2019"]] == ids["p1_p2"]
    # A stranger stays alone.
    assert [x["study_uid"] for x in priors(links, patient_id="P7")["studies"]] == [s["p7"]]


def test_unconfirming_a_link_takes_its_studies_out(links, person):
    s, ids = person
    links.review(ids["p1_p2"], "reopen", actor="archivist")
    result = priors(links, patient_id="P1", issuer="HOSP-A")
    assert {x["patient_id"] for x in result["studies"]} == {"P1"}
    assert ids["p1_p2"] in {link["id"] for link in result["open_links"]}


def test_unknown_or_ambiguous_patient_is_an_error(store, links):
    add_study(store, "DUP", "HOSP-A", date="20200101")
    add_study(store, "DUP", "HOSP-B", date="20200101")
    with pytest.raises(PriorsError) as unknown:
        priors(links, patient_id="NOBODY")
    assert unknown.value.exit_code == 1 and "NOBODY" in str(unknown.value)
    with pytest.raises(PriorsError) as ambiguous:
        priors(links, patient_id="DUP")
    assert "HOSP-A" in str(ambiguous.value) and "--issuer" in str(ambiguous.value)
    assert [x["issuer"] for x in priors(links, patient_id="DUP", issuer="HOSP-B")["studies"]] == ["HOSP-B"]


def test_cli_json_and_table_and_exit_codes(tmp_path, db_url, store, person, capsys):
    s, ids = person
    config = write_toml(tmp_path / "node.toml", node_config(tmp_path, db_url))

    assert main(["--config", str(config), "priors", "--patient-id", "P2", "--issuer", "HOSP-B",
                 "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [x["study_uid"] for x in result["studies"]][:2] == [s["p3_2018"], s["p1_2019"]]
    assert result["misfiled"][0]["study_uid"] == s["p1_wrong"]

    assert main(["--config", str(config), "priors", "--study-uid", s["p1_2019"]]) == 0
    table = capsys.readouterr().out
    assert table.index("20180101") < table.index("20190310") < table.index("misfiled") < table.index("open links")
    assert f"link {ids['p1_p2']}" in table

    assert main(["--config", str(config), "priors", "--patient-id", "NOBODY"]) == 1
    assert "no patient with Patient ID 'NOBODY'" in capsys.readouterr().err
    assert main(["--config", str(config), "priors", "--study-uid", "1.2.3.4"]) == 1
    assert "1.2.3.4" in capsys.readouterr().err
