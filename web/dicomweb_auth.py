"""Who is asking, for DICOMweb: the web pages' session cookie, or HTTP Basic against the same
accounts. Viewers (OHIF, Weasis) send Basic credentials with every request; anything else gets
401 with `WWW-Authenticate: Basic`, never the login page's redirect.

A Basic password is checked by `web.auth.check_password`, as a login: the same per-name attempt
counting, argon2 check slots and audit rows (`login_failed`, `login_throttled`, `login_busy`,
`login`, each with `{"via": "http-basic"}`). A viewer fetches hundreds of instances with the
same header, and an argon2 check holds 64 MiB and ~0.4 s, so a verified (name, password) pair is
remembered for CACHE_S as an HMAC under a per-process random key (never the password), together
with the account's password hash at that time. The account is re-read on every request: a
disabled account is refused at once, and a changed password no longer matches the remembered
hash, so the next request is checked again. A viewer opens with several requests at once: those
with the same credentials wait for the first one's check (a lock per digest stripe) instead of
each taking a check slot. Bearer tokens are not issued by this node.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict

from fastapi import HTTPException, Request

from web.auth import ROLES, CurrentUser, LoginRefused, LoginRequired, check_password, current_user

CHALLENGE = 'Basic realm="dicom-node DICOMweb", charset="UTF-8"'
CACHE_S = 300
CACHE_ENTRIES = 1024
STRIPES = 64
# Longest wait for another request's check of the same credentials; then this one checks itself.
STRIPE_WAIT_S = 5.0


class VerifiedCredentials:
    """HMAC(name, password) -> (password hash it was verified against, expiry): thread-safe, bounded."""

    def __init__(self, ttl_s: float = CACHE_S, entries: int = CACHE_ENTRIES) -> None:
        self.ttl_s, self.entries = ttl_s, entries
        self._key = secrets.token_bytes(32)
        self._seen: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(STRIPES)]

    def stripe(self, digest: bytes) -> threading.Lock:
        return self._stripes[digest[0] % STRIPES]

    def digest(self, name: str, password: str) -> bytes:
        return hmac.new(self._key, name.encode() + b"\0" + password.encode(), hashlib.sha256).digest()

    def holds(self, digest: bytes, password_hash: str) -> bool:
        with self._lock:
            found = self._seen.get(digest)
            if found is None:
                return False
            if found[1] < time.monotonic() or not hmac.compare_digest(found[0], password_hash):
                del self._seen[digest]
                return False
            return True

    def add(self, digest: bytes, password_hash: str) -> None:
        with self._lock:
            self._seen[digest] = (password_hash, time.monotonic() + self.ttl_s)
            self._seen.move_to_end(digest)
            while len(self._seen) > self.entries:
                self._seen.popitem(last=False)


_CREATE = threading.Lock()


def _verified(request: Request) -> VerifiedCredentials:
    """One cache per app (the tests build several apps in one process)."""
    state = request.app.state
    with _CREATE:
        if not hasattr(state, "dicomweb_credentials"):
            state.dicomweb_credentials = VerifiedCredentials()
    return state.dicomweb_credentials


def unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": CHALLENGE})


def _basic(request: Request, encoded: str) -> CurrentUser:
    try:
        decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise unauthorized("malformed Basic credentials") from None
    name, colon, password = decoded.partition(":")
    if not colon:
        raise unauthorized("malformed Basic credentials")
    name, password = name.strip()[:64], password[:1024]
    cache = _verified(request)
    digest = cache.digest(name, password)
    account = request.app.state.ctx.accounts.user(name) if name else None
    if account is not None and not account.disabled and cache.holds(digest, account.password_hash):
        return CurrentUser(account.name, account.role)
    stripe = cache.stripe(digest)
    held = stripe.acquire(timeout=STRIPE_WAIT_S)
    try:
        if held and account is not None and not account.disabled and cache.holds(digest, account.password_hash):
            return CurrentUser(account.name, account.role)      # checked while this request waited
        outcome = check_password(request, name, password, via="http-basic")
        if not isinstance(outcome, LoginRefused):
            cache.add(digest, outcome.password_hash)
    finally:
        if held:
            stripe.release()
    if isinstance(outcome, LoginRefused):
        if outcome.status == 401:
            raise unauthorized(outcome.message)
        raise HTTPException(outcome.status, outcome.message, headers=outcome.headers)
    request.app.state.ctx.accounts.audit(outcome.name, "login", detail={"via": "http-basic"})
    return CurrentUser(outcome.name, outcome.role)


def dicomweb_user(request: Request) -> CurrentUser:
    """Dependency of every DICOMweb route: any role reads (clinicians included)."""
    header = request.headers.get("authorization")
    if header:
        scheme, _, credentials = header.strip().partition(" ")
        if scheme.lower() != "basic":
            raise unauthorized(f"{scheme[:20]} authorization is not supported here: use Basic or the web session")
        user = _basic(request, credentials.strip())
    else:
        try:
            user = current_user(request)
        except LoginRequired:
            raise unauthorized("log in first: HTTP Basic with a web account, or the web session") from None
    if user.role not in ROLES:
        raise HTTPException(403, f"the role {user.role} cannot read images")
    return user
