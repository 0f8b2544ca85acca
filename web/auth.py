"""Logins, sessions, CSRF and roles, all enforced server-side.

* Session: Starlette's signed cookie (itsdangerous, key from `web.session_secret_file`),
  HttpOnly, SameSite=Lax, Secure with TLS or `web.secure_cookies`. It holds the user name,
  a random session id, the login time and the CSRF token: no PHI. A login lasts
  `web.session_lifetime_s` from the login; the account is re-read on every request, so a
  disabled account or a changed role takes effect at once. Logout revokes the session id
  (in the database, until it would have expired anyway, so a restart does not revive it).
* CSRF: a synchronizer token in the session, sent back by every POST as the form field
  `csrf_token` or the header `X-CSRF-Token`; a POST without the right one gets 403.
* Roles: clinician (read), archivist (read + review), admin (everything, audit, users).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from datetime import timedelta

from fastapi import Depends, HTTPException, Request

from db.accounts import AccountStore
from db.store import utcnow

ROLES = ("archivist", "clinician", "admin")
REVIEWERS = ("archivist", "admin")
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
# Failed logins per user name in the window before further tries are refused until it passes.
MAX_FAILURES, FAILURE_WINDOW_S = 5, 900


class LoginRequired(Exception):
    """No valid session: pages redirect to /login, the API answers 401."""


@dataclass(frozen=True)
class CurrentUser:
    name: str
    role: str

    @property
    def can_review(self) -> bool:
        return self.role in REVIEWERS

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class SessionGuard:
    """State behind the cookies: revoked session ids (in the database, through `accounts`) and
    failed-login counts (in memory: a restart only resets the throttling window)."""

    def __init__(self, lifetime_s: int, accounts: AccountStore) -> None:
        self.lifetime_s = lifetime_s
        self._accounts = accounts
        self._failures: dict[str, deque] = defaultdict(deque)
        self._lock = threading.Lock()

    def revoke(self, sid: str | None) -> None:
        if sid:
            self._accounts.revoke_session(sid, utcnow() + timedelta(seconds=self.lifetime_s))

    def revoked(self, sid: str) -> bool:
        return self._accounts.session_revoked(sid)

    def throttled(self, name: str) -> bool:
        now = time.time()
        with self._lock:
            tries = self._failures[name.lower()]
            while tries and tries[0] < now - FAILURE_WINDOW_S:
                tries.popleft()
            return len(tries) >= MAX_FAILURES

    def failed(self, name: str) -> None:
        with self._lock:
            self._failures[name.lower()].append(time.time())

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(name.lower(), None)


def csrf_token(request: Request) -> str:
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(32)
    return token


async def csrf_guard(request: Request) -> None:
    """App-wide dependency: every unsafe request must carry the session's CSRF token."""
    if request.method not in UNSAFE_METHODS:
        return
    sent = request.headers.get("x-csrf-token")
    if not sent and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")):
        sent = (await request.form()).get("csrf_token")
    expected = request.session.get("csrf")
    if not expected or not isinstance(sent, str) or not hmac.compare_digest(sent, expected):
        raise HTTPException(403, "CSRF token missing or wrong: reload the page and try again")


def current_user(request: Request) -> CurrentUser:
    session = request.session
    name, sid, at = session.get("user"), session.get("sid"), session.get("at")
    if not name or not sid or not isinstance(at, (int, float)):
        raise LoginRequired()
    guard: SessionGuard = request.app.state.guard
    if time.time() - at > guard.lifetime_s or guard.revoked(sid):
        session.clear()
        raise LoginRequired()
    user = request.app.state.ctx.accounts.user(name)
    if user is None or user.disabled:
        session.clear()
        raise LoginRequired()
    return CurrentUser(user.name, user.role)


def require(*roles: str):
    """Dependency: a logged-in user with one of these roles (403 otherwise)."""

    def check(user: CurrentUser = Depends(current_user)) -> CurrentUser:
        if user.role not in roles:
            raise HTTPException(403, f"this needs the role {' or '.join(roles)}; you are {user.role}")
        return user

    return check


any_user = require(*ROLES)
reviewer = require(*REVIEWERS)
admin = require("admin")


def log_in(request: Request, name: str, password: str) -> CurrentUser | str:
    """Check a name and password; on success start a fresh session. Returns the user, or
    the message to show. Audited either way."""
    from web.passwords import hash_password, needs_rehash, verify_password

    ctx, guard = request.app.state.ctx, request.app.state.guard
    name = (name or "").strip()[:64]
    if guard.throttled(name):
        ctx.accounts.audit(name or "?", "login_throttled")
        return "too many failed logins for this name: wait 15 minutes"
    user = ctx.accounts.user(name) if name else None
    ok = verify_password(user.password_hash if user and not user.disabled else None, password or "")
    if not ok:
        guard.failed(name)
        ctx.accounts.audit(name or "?", "login_failed")
        return "wrong name or password"
    guard.succeeded(name)
    if needs_rehash(user.password_hash):
        ctx.accounts.set_password_hash(user.name, hash_password(password))
    after = request.session.get("next")
    request.session.clear()       # a new session: nothing from before the login carries over
    request.session.update({"user": user.name, "sid": secrets.token_urlsafe(16), "at": int(time.time()),
                            "csrf": secrets.token_urlsafe(32)})
    if isinstance(after, str) and after.startswith("/") and not after.startswith("//"):
        request.session["next"] = after
    ctx.accounts.audit(user.name, "login")
    return CurrentUser(user.name, user.role)


def log_out(request: Request) -> None:
    name = request.session.get("user")
    request.app.state.guard.revoke(request.session.get("sid"))
    if name:
        request.app.state.ctx.accounts.audit(name, "logout")
    request.session.clear()
