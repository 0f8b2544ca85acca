"""Web pages and JSON API through FastAPI's TestClient: reviews, URLs without PHI, audit rows,
headers, thumbnails, the dashboard; and the pages served by a real `dicom-node serve`."""

from __future__ import annotations

import io
import re
import urllib.request
from html.parser import HTMLParser
from urllib.parse import urljoin, urlparse

from tests.helpers import free_port
from tests.web.site import PASSWORDS, PHI, audit_rows, client, logged_in, patient_pk

SAFE_URL = re.compile(r"^/(|queue|queue/worth-a-look|search|audit|users|login|logout|api/docs|api/openapi\.json|links/\d+|"
                      r"links/\d+/review|patients/\d+|users/\d+/disabled|thumbnails/series/\d+\.png|"
                      r"static/[\w.-]+)$")


# ----- reviews -----------------------------------------------------------------------------

def test_archivist_confirms_and_rejects_with_audit_link_events_and_weights(site, monkeypatch):
    c, token = logged_in(site, "ann")
    saved = []
    ctx_links = site["app"].state.ctx.links
    original = ctx_links.save_match_weights
    monkeypatch.setattr(ctx_links, "save_match_weights", lambda rows: saved.append(rows) or original(rows))
    first, second = site["ids"]["open_same"], site["ids"]["open_misfiled"]
    page = c.get(f"/links/{first}")
    assert 'id="confirm"' in page.text and 'data-key="c"' in page.text and f'href="/links/{second}"' in page.text
    done = c.post(f"/links/{first}/review", data={"decision": "confirm", "note": "same face",
                                                  "csrf_token": token}, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == f"/links/{second}"
    rejected = c.post(f"/api/links/{second}/review", json={"decision": "reject"}, headers={"X-CSRF-Token": token})
    assert rejected.status_code == 200 and rejected.json()["link"]["status"] == "rejected"
    assert rejected.json()["next"] is None

    links = site["links"]
    assert links.get(first).status == "confirmed" and links.get(first).decided_by == "ann"
    assert links.get(first).note == "same face"
    assert [e.action for e in links.events(first)][0] == "confirmed"
    decisions = [(r.user, r.action, r.target) for r in audit_rows(site) if r.action.startswith("link_")]
    assert decisions == [("ann", "link_confirm", f"link:{first}"), ("ann", "link_reject", f"link:{second}")]
    assert len(saved) == 2       # m/u weights re-estimated after each decision, as `dicom-node review` does
    assert c.get("/queue").text.count('class="link-row"') == 0
    # Deciding twice is a conflict, not a second event.
    assert c.post(f"/links/{first}/review", data={"decision": "confirm", "csrf_token": token}).status_code == 409


# ----- what the pages show and link to -----------------------------------------------------

class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("href", "src", "action") and value:
                self.urls.append(value)


def test_no_phi_in_any_url_the_pages_link_to(site):
    c, token = logged_in(site, "ada")
    pages, seen, urls = ["/"], set(), set()
    found = c.post("/search", data={"patient_id": "P100", "csrf_token": token}, follow_redirects=False)
    pages.append(found.headers["location"])
    by_name = c.post("/search", data={"name": "jane", "csrf_token": token})
    pages.append("/search-results")
    while pages and len(seen) < 60:
        path = pages.pop()
        if path in seen:
            continue
        seen.add(path)
        html = by_name.text if path == "/search-results" else c.get(path).text
        parser = _Links()
        parser.feed(html)
        for url in parser.urls:
            target = urlparse(urljoin("http://testserver" + path, url))
            assert target.netloc == "testserver" and not target.query, url
            urls.add(target.path)
            if target.path.endswith(".png") or target.path.startswith(("/static/", "/logout", "/api/openapi")):
                continue
            if target.path not in seen and "/review" not in target.path and "/disabled" not in target.path:
                pages.append(target.path)
    assert {f"/links/{i}" for i in site["ids"].values()} <= urls and any(u.startswith("/patients/") for u in urls)
    for url in urls:
        assert SAFE_URL.match(url), url
        assert not any(item.lower() in url.lower() for item in PHI + list(site["studies"].values())), url


def test_pages_that_show_patient_data_are_audited_without_phi_in_targets(site):
    c, token = logged_in(site, "cleo")
    link, pk = site["ids"]["open_same"], patient_pk(site, "P100")
    c.get(f"/links/{link}")
    c.get(f"/patients/{pk}")
    c.post("/search", data={"patient_id": "P200", "issuer": "HOSP-B", "csrf_token": token})
    c.get("/api/links")
    rows = [(r.action, r.target, r.detail) for r in audit_rows(site) if r.user == "cleo"]
    actions = [a for a, _, _ in rows]
    # One match: the search answers with that patient's timeline, a second view.
    assert [a for a in actions if a != "login"] == ["view_link", "view_timeline", "search", "view_timeline",
                                                     "api_list_links"]
    assert ("view_link", f"link:{link}") in [(a, t) for a, t, _ in rows]
    assert ("view_timeline", f"patient:{pk}") in [(a, t) for a, t, _ in rows]
    search = next(d for a, _, d in rows if a == "search")
    assert search == {"by": ["patient_id", "issuer"], "patients": [patient_pk(site, "P200")]}
    for _, target, detail in rows:
        assert not any(item in f"{target} {detail}" for item in PHI)


def test_timeline_shows_confirmed_priors_and_open_links_apart(site):
    c, token = logged_in(site, "cleo")
    found = c.post("/search", data={"patient_id": "P100", "csrf_token": token}, follow_redirects=False)
    assert found.status_code == 303
    page = c.get(found.headers["location"]).text
    studies = page.split('id="studies"')[1].split("</table>")[0]
    assert "20200505" in studies and f"confirmed link #{site['ids']['confirmed']}" in studies   # P200 joined
    assert "20210101" not in studies                                                           # open: apart
    open_links = page.split('id="open-links"')[1].split("</table>")[0]
    assert f"#{site['ids']['open_same']}" in open_links and "P300" in open_links
    api = c.get(found.headers["location"].replace("/patients/", "/api/patients/") + "/priors").json()
    assert [s["patient_id"] for s in api["studies"]] == ["P100", "P100", "P200"]   # misfiled link still open
    assert c.get("/patients/999999").status_code == 404


def test_review_page_shows_both_studies_evidence_and_thumbnails(site, tmp_path):
    c, _ = logged_in(site, "ann")
    page = c.get(f"/links/{site['ids']['open_same']}").text
    assert "P300" in page and "P100" in page and "HOSP-B" in page and "DOE^JANE" in page
    assert "Probability" in page and 'id="fields"' in page and 'id="image"' in page
    # The ingested CT: a real PNG from the stored DICOM, cached, for logged-in users only.
    series = site["store"].find_patient_pks(name="CompressedSamples") or site["store"].find_patient_pks(name="ct")
    studies = site["links"].find_studies(patient_pks=series)
    series_pk = site["store"].study_series([studies[0].study_pk])[studies[0].study_pk][0].series_pk
    first = c.get(f"/thumbnails/series/{series_pk}.png")
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert first.content[:8] == b"\x89PNG\r\n\x1a\n" and first.headers["cache-control"] == "no-store"
    from PIL import Image

    assert max(Image.open(io.BytesIO(first.content)).size) <= 256
    assert c.get(f"/thumbnails/series/{series_pk}.png").content == first.content
    assert len(site["app"].state.ctx.thumbnails._cache) == 1
    assert c.get("/thumbnails/series/999999.png").status_code == 404


def test_review_page_shows_the_image_check_where_the_model_made_one(site):
    from db.records_linkage import LinkDraft
    from linkage.decide import SAME

    studies = {x.study_uid: x for x in site["links"].find_studies(study_uids=[site["studies"]["p2"],
                                                                           site["studies"]["p3"]])}
    a, b = studies[site["studies"]["p2"]], studies[site["studies"]["p3"]]
    image = {"chest_xr": {"pairs": 2, "median_cosine": 0.91, "median_verification": 0.8317, "verified_pairs": 2,
                          "model": "chest_xr-net 1", "weight": 6.2},
             "fundus": {"pairs": 3, "median_cosine": 0.52, "model": "fundus-net 1", "weight": -1.6, "studies": 3,
                        "effective_studies": 1.5}}
    link_id, _ = site["links"].upsert(LinkDraft(
        key=f"{SAME}:{a.study_pk}:{b.study_pk}", kind=SAME, a_study_pk=a.study_pk, b_study_pk=b.study_pk,
        a_patient_pk=a.patient_pk, b_patient_pk=b.patient_pk, probability=0.9, weight=5.2, band="review",
        evidence={"image": image}))
    c, _ = logged_in(site, "ann")
    table = c.get(f"/links/{link_id}").text.split('id="image"')[1].split("</table>")[0]
    assert "median image check" in table
    rows = {r.split("</td>")[0].split(">")[-1]: r for r in table.split("<tr>")[2:]}
    assert "0.8317" in rows["chest_xr"] and "0.8317" not in rows["fundus"] and ">-<" in rows["fundus"]
    # a study judged against several studies of its ID says how many comparisons its weight counts
    assert "mean over 3 other studies of the ID, counted as 1.5 independent comparisons" in table
    assert table.count("independent comparisons") == 1


def test_review_page_names_the_studies_a_misfiled_flag_was_judged_without(site):
    from db.records_linkage import LinkDraft

    links = site["links"]
    wrong, p1 = (links.find_studies(study_uids=[site["studies"][k]])[0] for k in ("wrong", "p1"))
    link_id, _ = links.upsert(LinkDraft(f"misfiled:{p1.study_pk}", "different_patient_same_id", p1.study_pk,
                                        wrong.study_pk, p1.patient_pk, p1.patient_pk, 0.7, 0.8, "review",
                                        {"hypothesis": "study belongs to its patient",
                                         "left_out_studies": [wrong.study_uid]}))
    c, _ = logged_in(site, "ann")
    hint = re.search(r'<p class="hint" id="left-out">(.*?)</p>', c.get(f"/links/{link_id}").text, re.S)
    assert hint and "1 other" in hint.group(1) and wrong.study_uid in hint.group(1)
    assert 'id="left-out"' not in c.get(f"/links/{site['ids']['open_misfiled']}").text


def test_security_headers_and_no_inline_script_or_style(site):
    c, _ = logged_in(site, "ada")
    for path in ("/", "/queue", f"/links/{site['ids']['open_same']}", "/audit", "/users", "/api/docs", "/login"):
        answer = c.get(path)
        assert answer.status_code == 200, path
        csp = answer.headers["content-security-policy"]
        assert "unsafe-inline" not in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert answer.headers["x-frame-options"] == "DENY" and answer.headers["cache-control"] == "no-store"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert not re.search(r"<script(?![^>]*\bsrc=)", answer.text), path
        assert not re.search(r"\s(on\w+|style)=", answer.text), path


def test_dashboard_counts_and_models(site):
    import json

    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from db.models import Embedding, Series
    from db.store import utcnow
    card = site["settings"].resolve(site["settings"].pipeline.weights_dir) / "chest_xr" / "card.json"
    card.parent.mkdir(parents=True)
    card.write_text(json.dumps({"name": "cxr-net", "version": "2", "adaptation": {"source": "archive here"}}))
    with Session(site["engine"]) as session:            # 3 series by the carded model, 1 by an older version
        for k, pk in enumerate(session.scalars(select(Series.id).order_by(Series.id)).all()[:4]):
            session.add(Embedding(series_pk=pk, route="chest_xr", model_name="cxr-net", model_version="2" if k else "1",
                                  dim=1, vector=b"\0\0\x80?", created_at=utcnow()))
        session.commit()
    c, _ = logged_in(site, "cleo")
    stats = c.get("/api/dashboard").json()
    assert len(stats["instances_per_hour"]) == 24 and stats["instances_24h"] == 5
    assert stats["open_flags"] == 2 and stats["links"]["confirmed"] == 1
    assert stats["series_by_state"]["receiving"] == 5 and stats["failed_series"] == 0
    (model,) = stats["models"]
    assert (model["route"], model["embedded"], model["embedded_by_other_models"]) == ("chest_xr", 3, 1)
    assert model["adapted_on"] == "archive here"
    page = c.get("/").text
    assert 'id="open-flags">2<' in page and "instances received per hour" in page.lower()
    assert "--reembed" in page and "(adapted to archive here)" in page


def test_api_session_login_docs_and_openapi(site):
    c = client(site)
    token = c.get("/api/session").json()["csrf_token"]
    assert c.post("/api/login", json={"name": "ann", "password": "wrong-wrong"},
                  headers={"X-CSRF-Token": token}).status_code == 401
    answer = c.post("/api/login", json={"name": "ann", "password": PASSWORDS["ann"][1]},
                    headers={"X-CSRF-Token": token}).json()
    assert answer["role"] == "archivist" and answer["csrf_token"] != token
    listed = c.get("/api/links").json()
    assert [link["id"] for link in listed] == [site["ids"]["open_same"], site["ids"]["open_misfiled"]]
    schema = c.get("/api/openapi.json").json()
    assert {"/api/links", "/api/links/{link_id}/review", "/api/patients/{patient_pk}/priors",
            "/api/dashboard"} <= set(schema["paths"])
    assert "/api/links/{link_id}/review" in c.get("/api/docs").text
    found = c.post("/api/patients/search", json={"name": "roe"}, headers={"X-CSRF-Token": answer["csrf_token"]})
    assert [p["patient_id"] for p in found.json()] == ["P100"]


# ----- a real serve ------------------------------------------------------------------------

def test_serve_runs_the_web_pages_and_stops_on_sigterm(start_node):
    port = free_port()
    node = start_node(web={"enabled": True, "port": port})
    assert f"web pages on http://127.0.0.1:{port}/" in node.log()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=10) as answer:
        assert answer.status == 200 and answer.headers["X-Frame-Options"] == "DENY"
    assert (node.config_path.parent / "var" / "web-session.key").exists()
    assert node.stop() == 0
    assert "GET /login" not in node.log()           # no access log
