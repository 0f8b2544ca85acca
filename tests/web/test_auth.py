"""Web logins, sessions, CSRF, roles and accounts through FastAPI's TestClient; the account store,
`dicom-node user`, the session secret file and cookies behind a TLS proxy."""

from __future__ import annotations

import io
import stat
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from db.accounts import AccountError, AccountStore
from db.engine import make_engine
from db.links import LinkStore
from db.store import utcnow
from dicom_node.cli import main
from dicom_node.config import settings_from_dict
from tests.helpers import node_config, write_toml
from tests.test_priors import SAME, add_link, add_study
from tests.web.site import PASSWORDS, audit_rows, client, logged_in, login_page_token, patient_pk
from web.app import create_app
from web.server import session_secret


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


def test_a_logged_out_cookie_stays_refused_after_a_restart(site):
    c, token = logged_in(site, "ann")
    stolen = dict(c.cookies)
    c.post("/logout", data={"csrf_token": token})
    restarted = create_app(site["settings"], site["engine"], "k" * 64)       # same database and key
    replay = TestClient(restarted, base_url="http://testserver", cookies=stolen)
    assert replay.get("/", follow_redirects=False).headers["location"] == "/login"
    fresh, _ = logged_in(dict(site, app=restarted), "ann")                   # other sessions still work
    assert fresh.get("/").status_code == 200


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
    accounts.revoke_session("old", utcnow() - timedelta(seconds=1))
    accounts.revoke_session("new", utcnow() + timedelta(hours=1))             # drops the expired "old"
    accounts.revoke_session("new", utcnow() + timedelta(hours=1))             # twice is fine
    assert accounts.session_revoked("new") and not accounts.session_revoked("old")

    a = add_study(store, "Q1", "X", name="SMITH^ANNA", date="20200101")
    b = add_study(store, "Q2", "X", name="SMITH^ANNA", date="20210101")
    add_link(links, SAME, a, b, 0.9, decision=None)
    hour = utcnow().strftime("%Y-%m-%dT%H")
    per_hour = store.instances_per_hour(utcnow().replace(minute=0, second=0, microsecond=0))
    assert per_hour.get(hour) == 2 or sum(per_hour.values()) == 2
    assert links.link_counts() == {"open": 1, "confirmed": 0, "rejected": 0, "worth-a-look": 0}
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
