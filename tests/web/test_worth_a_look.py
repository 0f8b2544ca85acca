"""The ranked "worth a look" list below the review band: stored, listed apart, never a flag."""

from __future__ import annotations

import json

from linkage import decide as D
from tests.helpers import node_config, write_toml
from tests.test_priors import MISFILED, SAME, add_link, add_study
from tests.web.site import logged_in


def test_stored_band():
    t = D.Thresholds()
    weak = D.Decision(0.2, -2.0, "withdrawn", 1, 2)
    assert D.stored_band(weak, t) == D.WORTH_A_LOOK
    assert D.stored_band(D.Decision(0.01, -5.0, "withdrawn", 1, 2), t) == "withdrawn"
    assert D.stored_band(weak, D.Thresholds(worth_a_look=0)) == "withdrawn"            # 0: off
    assert D.stored_band(D.Decision(0.7, 1.0, "review", 1, 2), t) == "review"


def test_worth_a_look_links_are_ranked_apart_from_the_flags(site, capsys, tmp_path):
    links, store = site["links"], site["store"]
    s = {"x": add_study(store, "P900", "HOSP-C", date="20220101"),
         "y": add_study(store, "P901", "HOSP-C", date="20220202"),
         "z": add_study(store, "P902", "HOSP-C", date="20220303")}
    weaker = add_link(links, SAME, s["x"], s["y"], 0.08, decision=None, band=D.WORTH_A_LOOK)
    stronger = add_link(links, MISFILED, s["z"], s["y"], 0.3, decision=None, band=D.WORTH_A_LOOK)
    flags = {v.id for v in links.list(status="open")}
    assert flags == {site["ids"]["open_same"], site["ids"]["open_misfiled"]}          # not flags
    assert [v.id for v in links.list(status="open", bands=(D.WORTH_A_LOOK,))] == [stronger, weaker]
    assert links.link_counts()["open"] == 2 and links.link_counts()[D.WORTH_A_LOOK] == 2
    z_patient = links.find_studies(study_uids=[s["z"]])[0].patient_pk
    assert links.suspect_studies([z_patient]) == set()          # a weak misfiled link leaves its study in

    from dicom_node.cli import main
    config = write_toml(tmp_path / "cli.toml", node_config(tmp_path, db_url=site["settings"].database_url))
    assert main(["--config", str(config), "links", "--status", "worth-a-look", "--format", "json"]) == 0
    assert [v["id"] for v in json.loads(capsys.readouterr().out)] == [stronger, weaker]

    c, _ = logged_in(site, "ada")
    page = c.get("/queue/worth-a-look").text
    assert page.count('class="link-row"') == 2 and page.index(f'data-link="{stronger}"') < page.index(
        f'data-link="{weaker}"')
    queue = c.get("/queue").text
    assert queue.count('class="link-row"') == 2 and 'href="/queue/worth-a-look"' in queue
