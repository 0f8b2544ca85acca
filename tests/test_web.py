"""Web pages and JSON API through FastAPI's TestClient: logins, CSRF, roles, URLs without
PHI, audit rows, headers, thumbnails; the account store and `dicom-node user`; and the
pages served by a real `dicom-node serve`."""

from __future__ import annotations

import io
import re
import stat
import urllib.request
from html.parser import HTMLParser
from urllib.parse import urljoin, urlparse

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from db.accounts import AccountError, AccountStore
from db.engine import make_engine
from db.links import LinkStore
from db.migrate import upgrade
from db.models import AuditEvent
from db.store import IdentityStore, utcnow
from dicom_node.cli import main
from dicom_node.config import settings_from_dict
from tests.helpers import corpus_path, free_port, node_config, write_toml
from tests.test_priors import MISFILED, SAME, add_link, add_study
from web.app import create_app
from web.passwords import hash_password
from web.server import session_secret

PASSWORDS = {"ann": ("archivist", "ann-archivist-1"), "cleo": ("clinician", "cleo-clinician-1"),
             "ada": ("admin", "ada-admin-pass-1")}
PHI = ["P100", "P200", "P300", "DOE^JANE", "ROE^RICHARD", "19700101", "19550505", "HOSP-A", "HOSP-B"]
SAFE_URL = re.compile(r"^/(|queue|search|audit|users|login|logout|api/docs|api/openapi\.json|links/\d+|"
                      r"links/\d+/review|patients/\d+|users/\d+/disabled|thumbnails/series/\d+\.png|"
                      r"static/[\w.-]+)$")


# ----- fixtures ----------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def cheap_hashes(monkeypatch):
    """argon2 at its production cost takes ~0.4 s a hash here; the tests need only its behaviour."""
    from argon2 import PasswordHasher

    from web import passwords

    cheap = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    monkeypatch.setattr(passwords, "_HASHER", cheap)
    monkeypatch.setattr(passwords, "_DUMMY", cheap.hash("not a password of anyone"))


@pytest.fixture
def site(tmp_path):
    """A migrated SQLite database with three users, a person under two IDs, a misfiled
    study, two open links and a real CT image; and the app over it."""
    config = node_config(tmp_path, web={"enabled": True})
    settings = settings_from_dict(config, base_dir=tmp_path)
    engine = make_engine(settings.database_url)
    upgrade(engine)
    store, links, accounts = IdentityStore(engine), LinkStore(engine), AccountStore(engine)
    for name, (role, password) in PASSWORDS.items():
        accounts.add_user(name, hash_password(password), role)
    s = {"p1": add_study(store, "P100", "HOSP-A", name="DOE^JANE", birth="19700101", sex="F", date="20190310"),
         "p2": add_study(store, "P200", "HOSP-B", name="DOE^JANE", birth="19700101", sex="F", date="20200505"),
         "p3": add_study(store, "P300", "HOSP-B", name="DOE^JANE", birth="19700101", sex="F", date="20210101"),
         "wrong": add_study(store, "P100", "HOSP-A", name="ROE^RICHARD", birth="19550505", date="20200101")}
    ids = {"confirmed": add_link(links, SAME, s["p1"], s["p2"], 0.97),
           "open_same": add_link(links, SAME, s["p3"], s["p1"], 0.91, decision=None),
           "open_misfiled": add_link(links, MISFILED, s["wrong"], s["p1"], 0.88, decision=None)}
    from dicom_node.node import build

    assert build(settings, migrate=False).ingestor.ingest_file(corpus_path("explicit_le"), "TESTSCU").ok
    app = create_app(settings, engine, "k" * 64)
    yield {"app": app, "engine": engine, "links": links, "accounts": accounts, "studies": s, "ids": ids,
           "store": store, "settings": settings}
    engine.dispose()


def client(site) -> TestClient:
    return TestClient(site["app"], base_url="http://testserver")


def login_page_token(c: TestClient) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)


def logged_in(site, name: str) -> tuple[TestClient, str]:
    c = client(site)
    answer = c.post("/login", data={"name": name, "password": PASSWORDS[name][1],
                                    "csrf_token": login_page_token(c)}, follow_redirects=False)
    assert answer.status_code == 303, answer.text
    return c, c.get("/api/session").json()["csrf_token"]


def audit_rows(site) -> list[AuditEvent]:
    with site["engine"].connect() as conn:
        return list(conn.execute(select(AuditEvent).order_by(AuditEvent.id)).all())


def patient_pk(site, patient_id: str) -> int:
    return site["links"].patient_pks(patient_id)[0]


# ----- login and sessions ------------------------------------------------------------------

def test_login_failure_then_success_sets_a_safe_cookie(site):
    c = client(site)
    token = login_page_token(c)
    wrong = c.post("/login", data={"name": "ann", "password": "nope-nope", "csrf_token": token},
                   follow_redirects=False)
    assert wrong.status_code == 401 and "wrong name or password" in wrong.text
    unknown = c.post("/login", data={"name": "nobody", "password": "x" * 10, "csrf_token": token},
                     follow_redirects=False)
    assert unknown.status_code == 401

    right = c.post("/login", data={"name": "ann", "password": PASSWORDS["ann"][1], "csrf_token": token},
                   follow_redirects=False)
    assert right.status_code == 303 and right.headers["location"] == "/"
    cookie = right.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie
    assert "Log out" in c.get("/").text
    assert [(r.user, r.action) for r in audit_rows(site)][-3:] == [
        ("ann", "login_failed"), ("nobody", "login_failed"), ("ann", "login")]

    c.post("/logout", data={"csrf_token": c.get("/api/session").json()["csrf_token"]})
    assert c.get("/", follow_redirects=False).headers["location"] == "/login"


def test_disabled_account_loses_its_session_and_cannot_log_in(site):
    c, _ = logged_in(site, "cleo")
    assert c.get("/").status_code == 200
    site["accounts"].set_disabled("cleo")
    assert c.get("/", follow_redirects=False).status_code == 303
    again = client(site)
    assert again.post("/login", data={"name": "cleo", "password": PASSWORDS["cleo"][1],
                                      "csrf_token": login_page_token(again)}).status_code == 401


def test_logged_out_request_to_every_page_redirects_to_login(site):
    for path in ("/", "/queue", "/links/1", "/patients/1", "/search", "/audit", "/users", "/api/docs",
                 "/thumbnails/series/1.png"):
        answer = client(site).get(path, follow_redirects=False)
        assert answer.status_code == 303 and answer.headers["location"] == "/login", path


def test_logged_out_api_answers_401_and_post_without_token_403(site):
    c = client(site)
    for path in ("/api/links", "/api/links/1", "/api/dashboard", "/api/patients/1/priors", "/api/openapi.json"):
        assert c.get(path).status_code == 401, path
    assert c.post("/links/1/review", data={"decision": "confirm"}).status_code == 403


def test_after_login_the_user_lands_on_the_page_asked_for(site):
    c = client(site)
    link = site["ids"]["open_same"]
    c.get(f"/links/{link}", follow_redirects=False)
    answer = c.post("/login", data={"name": "cleo", "password": PASSWORDS["cleo"][1],
                                    "csrf_token": login_page_token(c)}, follow_redirects=False)
    assert answer.headers["location"] == f"/links/{link}"


def test_repeated_failed_logins_are_throttled(site):
    c = client(site)
    token = login_page_token(c)
    for _ in range(5):
        c.post("/login", data={"name": "ada", "password": "wrong-wrong", "csrf_token": token})
    blocked = c.post("/login", data={"name": "ada", "password": PASSWORDS["ada"][1], "csrf_token": token})
    assert blocked.status_code == 401 and "too many failed logins" in blocked.text


# ----- CSRF and roles ----------------------------------------------------------------------

def test_post_without_or_with_a_wrong_csrf_token_is_rejected(site):
    c, token = logged_in(site, "ann")
    link = site["ids"]["open_same"]
    assert c.post(f"/links/{link}/review", data={"decision": "confirm"}).status_code == 403
    assert c.post(f"/links/{link}/review", data={"decision": "confirm", "csrf_token": "x" + token}
                  ).status_code == 403
    assert c.post(f"/api/links/{link}/review", json={"decision": "confirm"}).status_code == 403
    assert site["links"].get(link).status == "open"
    # The login form needs one too.
    assert client(site).post("/login", data={"name": "ann", "password": PASSWORDS["ann"][1]}).status_code == 403


def test_clinician_reads_but_cannot_review(site):
    c, token = logged_in(site, "cleo")
    link = site["ids"]["open_same"]
    page = c.get(f"/links/{link}")
    assert page.status_code == 200 and 'id="confirm"' not in page.text and "Read-only" in page.text
    assert c.post(f"/links/{link}/review", data={"decision": "confirm", "csrf_token": token}).status_code == 403
    assert c.post(f"/api/links/{link}/review", json={"decision": "reject"},
                  headers={"X-CSRF-Token": token}).status_code == 403
    assert c.get(f"/patients/{patient_pk(site, 'P100')}").status_code == 200
    assert c.get("/audit").status_code == 403 and c.get("/api/audit").status_code == 403
    assert site["links"].get(link).status == "open"


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
    c, _ = logged_in(site, "cleo")
    stats = c.get("/api/dashboard").json()
    assert len(stats["instances_per_hour"]) == 24 and stats["instances_24h"] == 5
    assert stats["open_flags"] == 2 and stats["links"]["confirmed"] == 1
    assert stats["series_by_state"]["receiving"] == 5 and stats["failed_series"] == 0
    page = c.get("/").text
    assert 'id="open-flags">2<' in page and "instances received per hour" in page.lower()


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


def test_admin_adds_and_disables_users_in_the_pages(site):
    c, token = logged_in(site, "ada")
    assert c.post("/users", data={"name": "dan", "role": "clinician", "password": "short", "csrf_token": token}
                  ).status_code == 400
    assert c.post("/users", data={"name": "dan", "role": "clinician", "password": "long-enough-1",
                                  "csrf_token": token}, follow_redirects=False).status_code == 303
    dan = site["accounts"].user("dan")
    assert dan.role == "clinician" and dan.password_hash.startswith("$argon2id$")
    c.post(f"/users/{dan.id}/disabled", data={"disabled": "1", "csrf_token": token})
    assert site["accounts"].user("dan").disabled
    assert [r.action for r in audit_rows(site)][-2:] == ["user_add", "user_disable"]
    assert "user_disable" in c.get("/audit").text


# ----- stores, CLI, secret file, serve -----------------------------------------------------

def test_account_store_and_dashboard_queries(store):
    accounts, links = AccountStore(store.engine), LinkStore(store.engine)
    accounts.add_user("ann", "hash", "archivist")
    with pytest.raises(AccountError):
        accounts.add_user("ann", "hash", "admin")
    with pytest.raises(AccountError):
        accounts.add_user("bob", "hash", "superuser")
    accounts.audit("ann", "view_link", "link:1", {"studies": [1, 2]})
    assert [(e.user, e.target, e.detail) for e in accounts.audit_events()] == [("ann", "link:1", {"studies": [1, 2]})]
    assert accounts.set_disabled("ann").disabled and [u.name for u in accounts.users()] == ["ann"]

    a = add_study(store, "Q1", "X", name="SMITH^ANNA", date="20200101")
    b = add_study(store, "Q2", "X", name="SMITH^ANNA", date="20210101")
    add_link(links, SAME, a, b, 0.9, decision=None)
    hour = utcnow().strftime("%Y-%m-%dT%H")
    per_hour = store.instances_per_hour(utcnow().replace(minute=0, second=0, microsecond=0))
    assert per_hour.get(hour) == 2 or sum(per_hour.values()) == 2
    assert links.link_counts() == {"open": 1, "confirmed": 0, "rejected": 0}
    assert len(store.find_patient_pks(name="smith")) == 2 and store.find_patient_pks(patient_id="Q2", issuer="X")
    assert store.find_patient_pks() == [] and store.find_patient_pks(patient_id="Q2", issuer="Y") == []


def test_user_cli_add_list_disable(tmp_path, monkeypatch, capsys):
    config = str(write_toml(tmp_path / "node.toml", node_config(tmp_path)))
    monkeypatch.setattr("sys.stdin", io.StringIO("a-good-password\n"))
    assert main(["--config", config, "user", "add", "zoe", "--role", "admin", "--password-stdin"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["--config", config, "user", "add", "yan", "--role", "clinician", "--password-stdin"]) == 1
    assert main(["--config", config, "user", "disable", "zoe"]) == 0
    assert main(["--config", config, "user", "disable", "nobody"]) == 1
    capsys.readouterr()
    assert main(["--config", config, "user", "list"]) == 0
    out = capsys.readouterr().out
    assert "zoe" in out and "admin" in out and "disabled" in out and "yan" not in out
    accounts = AccountStore(make_engine(f"sqlite:///{tmp_path / 'node.db'}"))
    assert [e.action for e in reversed(accounts.audit_events())] == ["user_add", "user_disable"]


def test_session_secret_is_created_once_with_mode_0600(tmp_path):
    path = tmp_path / "var" / "web.key"
    secret = session_secret(path)
    assert len(secret) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert session_secret(path) == secret


def test_secure_cookie_behind_a_tls_proxy_and_tls_files_go_in_pairs(site, tmp_path):
    from dicom_node.config import ConfigError

    settings = site["settings"].model_copy(update={"web": site["settings"].web.model_copy(
        update={"secure_cookies": True})})
    c = TestClient(create_app(settings, site["engine"], "s" * 64), base_url="https://testserver")
    answer = c.post("/login", data={"name": "ann", "password": PASSWORDS["ann"][1],
                                    "csrf_token": login_page_token(c)}, follow_redirects=False)
    assert "; secure" in answer.headers["set-cookie"].lower()
    assert answer.headers["strict-transport-security"].startswith("max-age=")
    with pytest.raises(ConfigError, match="web"):
        settings_from_dict({"web": {"tls_cert_file": "node.pem"}}, base_dir=tmp_path)


def test_serve_runs_the_web_pages_and_stops_on_sigterm(start_node):
    port = free_port()
    node = start_node(web={"enabled": True, "port": port})
    assert f"web pages on http://127.0.0.1:{port}/" in node.log()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=10) as answer:
        assert answer.status == 200 and answer.headers["X-Frame-Options"] == "DENY"
    assert (node.config_path.parent / "var" / "web-session.key").exists()
    assert node.stop() == 0
    assert "GET /login" not in node.log()           # no access log
