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
* DICOMweb (`/dicomweb/`, GET only) also takes HTTP Basic against the same accounts, through
  `check_password`: the same throttling, check slots and audit as the login form
  (`web.dicomweb_auth`).
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
from db.records_web import UserRecord
from db.store import utcnow

ROLES = ("archivist", "clinician", "admin")
REVIEWERS = ("archivist", "admin")
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
# Login attempts per user name in the window before further tries are refused until it passes.
# An attempt counts from the moment its password check is reserved, not when it fails, so a
# burst of parallel guesses cannot all be checked before the first failure is recorded.
MAX_FAILURES, FAILURE_WINDOW_S = 5, 900
# How long a login waits for a password-check slot (web.max_concurrent_password_checks) before
# it is answered 503: each argon2 check holds 64 MiB, so logins never queue up behind them.
PASSWORD_SLOT_WAIT_S = 1.0
RETRY_AFTER_S = 2
# Above this many names in the failure table, names whose attempts are all past the window go.
_SWEEP_AT = 10_000


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
    """State behind the cookies: revoked session ids (in the database, through `accounts`),
    login attempts per name and the password-check slots (in memory: a restart only resets the
    throttling window)."""

    def __init__(self, lifetime_s: int, accounts: AccountStore, password_checks: int = 2) -> None:
        self.lifetime_s = lifetime_s
        self._accounts = accounts
        self._attempts: dict[str, deque] = defaultdict(deque)
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(password_checks)
        self.slot_wait_s = PASSWORD_SLOT_WAIT_S

    def revoke(self, sid: str | None) -> None:
        if sid:
            self._accounts.revoke_session(sid, utcnow() + timedelta(seconds=self.lifetime_s))

    def revoked(self, sid: str) -> bool:
        return self._accounts.session_revoked(sid)

    def reserve(self, name: str) -> float | None:
        """Count one login attempt for `name`, or None when its window is full. Check and count
        are one step under the lock: at most MAX_FAILURES attempts per window get checked."""
        now = time.monotonic()
        with self._lock:
            if len(self._attempts) > _SWEEP_AT:
                for key in [k for k, v in self._attempts.items() if not v or v[-1] < now - FAILURE_WINDOW_S]:
                    del self._attempts[key]
            tries = self._attempts[name.lower()]
            while tries and tries[0] < now - FAILURE_WINDOW_S:
                tries.popleft()
            if len(tries) >= MAX_FAILURES:
                return None
            tries.append(now)
            return now

    def unreserve(self, name: str, ticket: float) -> None:
        """Give back an attempt whose password was never checked (no slot was free)."""
        with self._lock:
            tries = self._attempts.get(name.lower())
            if tries is not None and ticket in tries:
                tries.remove(ticket)

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._attempts.pop(name.lower(), None)

    def password_slot(self) -> bool:
        """Take a password-check slot (give it back with `release_slot`); False when none frees up
        within `slot_wait_s`."""
        return self._slots.acquire(timeout=self.slot_wait_s)

    def release_slot(self) -> None:
        self._slots.release()


@dataclass(frozen=True)
class LoginRefused:
    """Why a login did not happen: the message to show, the status, and Retry-After if any."""
    message: str
    status: int = 401
    retry_after: int | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after else {}


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


def check_password(request: Request, name: str, password: str, via: str | None = None) -> UserRecord | LoginRefused:
    """The password check of a login, throttled and audited as one: the account, or why not. Starts
    no session, so HTTP Basic (`web.dicomweb_auth`, `via="http-basic"`) goes through the very same
    attempt counting and check slots as the login form."""
    from web import passwords

    ctx, guard = request.app.state.ctx, request.app.state.guard
    detail = {"via": via} if via else None
    ticket = guard.reserve(name)
    if ticket is None:
        ctx.accounts.audit(name or "?", "login_throttled", detail=detail)
        return LoginRefused("too many failed logins for this name: wait 15 minutes")
    if not guard.password_slot():
        guard.unreserve(name, ticket)       # never checked: not a guess
        ctx.accounts.audit(name or "?", "login_busy", detail=detail)
        return LoginRefused("the server is busy checking other logins: try again in a moment", 503, RETRY_AFTER_S)
    try:
        user = ctx.accounts.user(name) if name else None
        ok = passwords.verify_password(user.password_hash if user and not user.disabled else None, password or "")
        if ok and passwords.needs_rehash(user.password_hash):
            ctx.accounts.set_password_hash(user.name, passwords.hash_password(password))
            user = ctx.accounts.user(user.name) or user     # with the new hash
    finally:
        guard.release_slot()
    if not ok:
        ctx.accounts.audit(name or "?", "login_failed", detail=detail)     # the attempt stays counted
        return LoginRefused("wrong name or password")
    guard.succeeded(name)
    return user


def log_in(request: Request, name: str, password: str) -> CurrentUser | LoginRefused:
    """Check a name and password; on success start a fresh session. Returns the user, or why
    not. Audited either way."""
    name = (name or "").strip()[:64]
    user = check_password(request, name, password)
    if isinstance(user, LoginRefused):
        return user
    after = request.session.get("next")
    request.session.clear()       # a new session: nothing from before the login carries over
    request.session.update({"user": user.name, "sid": secrets.token_urlsafe(16), "at": int(time.time()),
                            "csrf": secrets.token_urlsafe(32)})
    if isinstance(after, str) and after.startswith("/") and not after.startswith("//"):
        request.session["next"] = after
    request.app.state.ctx.accounts.audit(user.name, "login")
    return CurrentUser(user.name, user.role)


def log_out(request: Request) -> None:
    name = request.session.get("user")
    request.app.state.guard.revoke(request.session.get("sid"))
    if name:
        request.app.state.ctx.accounts.audit(name, "logout")
    request.session.clear()
