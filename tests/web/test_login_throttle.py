"""Login throttling under real concurrency: TestClients in threads, each with its own event loop,
so requests really overlap in the app. Password checks are counted and held open to widen the race."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dicom_node.config import ConfigError, settings_from_dict
from tests.web.site import PASSWORDS, audit_rows, client, login_page_token
from web import passwords


class HeldChecks:
    """Wraps verify_password: counts the checks, and holds each one until `release` is set."""

    def __init__(self, monkeypatch):
        self.calls, self.in_flight, self.most_at_once = 0, 0, 0
        self.release = threading.Event()
        self._lock = threading.Lock()
        real = passwords.verify_password

        def verify(password_hash, password):
            with self._lock:
                self.calls += 1
                self.in_flight += 1
                self.most_at_once = max(self.most_at_once, self.in_flight)
            try:
                self.release.wait(10)
                return real(password_hash, password)
            finally:
                with self._lock:
                    self.in_flight -= 1

        monkeypatch.setattr(passwords, "verify_password", verify)

    def wait_for(self, calls: int, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while self.calls < calls and time.monotonic() < deadline:
            time.sleep(0.01)


def _login(site, name, password):
    """One login through the form, on its own client (its own cookies and event loop)."""
    c = client(site)
    token = login_page_token(c)
    return lambda: c.post("/login", data={"name": name, "password": password, "csrf_token": token},
                          follow_redirects=False)


def test_parallel_wrong_guesses_then_the_right_password_do_not_log_in(site, monkeypatch):
    # Guesses wait for a check slot as long as they must: none gives its count back by timing out.
    monkeypatch.setattr(site["app"].state.guard, "slot_wait_s", 30, raising=False)
    held = HeldChecks(monkeypatch)
    wrong = [_login(site, "ada", f"guess-{n:04d}") for n in range(39)]
    right = _login(site, "ada", PASSWORDS["ada"][1])
    start = threading.Barrier(len(wrong))

    def fire(send):
        start.wait(10)
        return send()

    with ThreadPoolExecutor(len(wrong) + 1) as pool:
        guesses = [pool.submit(fire, send) for send in wrong]
        held.wait_for(2)                  # wrong guesses are being checked right now...
        last = pool.submit(right)         # ...when the right password arrives
        time.sleep(0.3)
        held.release.set()
        answers = [g.result(30) for g in guesses] + [last.result(30)]
    assert not any(a.status_code == 303 for a in answers), "a login got through"
    assert held.calls <= 5, f"{held.calls} passwords checked"
    assert held.most_at_once <= 2                    # web.max_concurrent_password_checks
    assert {a.status_code for a in answers} <= {401, 503}
    assert "too many failed logins" in answers[-1].text
    actions = [r.action for r in audit_rows(site) if r.user == "ada"]
    assert actions.count("login_failed") == held.calls and "login" not in actions


def test_a_login_that_finds_every_check_slot_busy_gets_503_with_retry_after(site, monkeypatch):
    monkeypatch.setattr(site["app"].state.guard, "slot_wait_s", 0.2)
    held = HeldChecks(monkeypatch)
    busy = [_login(site, name, "wrong-wrong") for name in ("ann", "cleo")]     # the 2 slots
    late = client(site)
    token = late.get("/api/session").json()["csrf_token"]
    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(send) for send in busy]
        held.wait_for(2)
        page = _login(site, "ada", PASSWORDS["ada"][1])()
        api = late.post("/api/login", json={"name": "ada", "password": PASSWORDS["ada"][1]},
                        headers={"X-CSRF-Token": token})
        held.release.set()
        assert [r.result(30).status_code for r in running] == [401, 401]
    for answer in (page, api):
        assert answer.status_code == 503 and int(answer.headers["retry-after"]) >= 1
        assert "busy" in answer.text and answer.headers["x-frame-options"] == "DENY"
    assert held.calls == 2
    # A refused login was never checked, so it does not count against the name: it works now.
    assert _login(site, "ada", PASSWORDS["ada"][1])().status_code == 303


def test_max_concurrent_password_checks_setting(tmp_path):
    assert settings_from_dict({}, base_dir=tmp_path).web.max_concurrent_password_checks == 2
    web = settings_from_dict({"web": {"max_concurrent_password_checks": 4}}, base_dir=tmp_path).web
    assert web.max_concurrent_password_checks == 4
    with pytest.raises(ConfigError, match="max_concurrent_password_checks"):
        settings_from_dict({"web": {"max_concurrent_password_checks": 0}}, base_dir=tmp_path)
