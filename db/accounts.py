"""Web accounts, logged-out sessions and the web audit trail (`web_user`, `web_revoked_session`,
`audit_event`); plain data in and out.

Password hashing lives in `web.passwords`: this store keeps and returns hashes only.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Engine, delete, select

from db.engine import make_sessionmaker
from db.link_records import _iso
from db.models import AuditEvent, RevokedSession, UserRole, WebUser
from db.records_web import AuditRecord, UserRecord
from db.store import utcnow


class AccountError(Exception):
    """An account change that cannot be applied (duplicate or unknown name, bad role)."""


class AccountStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = make_sessionmaker(engine)
        self._read = make_sessionmaker(engine.execution_options(read_only=True))

    # ----- accounts ----------------------------------------------------------------------

    def add_user(self, name: str, password_hash: str, role: str) -> UserRecord:
        name = name.strip()
        if not name or len(name) > 64:
            raise AccountError("a user name is 1-64 characters")
        try:
            role_value = UserRole(role)
        except ValueError:
            raise AccountError(f"unknown role {role!r} (archivist, clinician or admin)") from None
        with self._sessions.begin() as session:
            if session.scalar(select(WebUser.id).where(WebUser.name == name)) is not None:
                raise AccountError(f"user {name!r} already exists")
            user = WebUser(name=name, password_hash=password_hash, role=role_value, created_at=utcnow(),
                           disabled=False)
            session.add(user)
            session.flush()
            return _user(user)

    def user(self, name: str | None = None, user_id: int | None = None) -> UserRecord | None:
        query = select(WebUser)
        query = query.where(WebUser.name == name) if user_id is None else query.where(WebUser.id == user_id)
        with self._read() as session:
            row = session.scalars(query).first()
            return _user(row) if row else None

    def users(self) -> list[UserRecord]:
        with self._read() as session:
            return [_user(u) for u in session.scalars(select(WebUser).order_by(WebUser.name))]

    def set_disabled(self, name: str, disabled: bool = True) -> UserRecord:
        with self._sessions.begin() as session:
            user = session.scalars(select(WebUser).where(WebUser.name == name)).first()
            if user is None:
                raise AccountError(f"no user {name!r}")
            user.disabled = disabled
            return _user(user)

    def set_password_hash(self, name: str, password_hash: str) -> None:
        with self._sessions.begin() as session:
            user = session.scalars(select(WebUser).where(WebUser.name == name)).first()
            if user is None:
                raise AccountError(f"no user {name!r}")
            user.password_hash = password_hash

    # ----- logged-out sessions ------------------------------------------------------------

    def revoke_session(self, sid: str, expires_at: datetime) -> None:
        """Refuse session `sid` until `expires_at`; rows past their expiry are dropped here."""
        with self._sessions.begin() as session:
            session.execute(delete(RevokedSession).where(RevokedSession.expires_at <= utcnow()))
            if session.get(RevokedSession, sid) is None:
                session.add(RevokedSession(sid=sid, expires_at=expires_at))

    def session_revoked(self, sid: str) -> bool:
        with self._read() as session:
            return session.get(RevokedSession, sid) is not None

    # ----- audit trail -------------------------------------------------------------------

    def audit(self, user: str, action: str, target: str | None = None, detail: dict | None = None) -> None:
        """Record one event. `target` is an internal id such as "link:12" or "patient:7"."""
        with self._sessions.begin() as session:
            session.add(AuditEvent(at=utcnow(), user=(user or "?")[:64], action=action[:32],
                                   target=target[:64] if target else None, detail=detail))

    def audit_events(self, limit: int = 200, user: str | None = None, action: str | None = None
                     ) -> list[AuditRecord]:
        query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
        if user is not None:
            query = query.where(AuditEvent.user == user)
        if action is not None:
            query = query.where(AuditEvent.action == action)
        with self._read() as session:
            return [AuditRecord(e.id, _iso(e.at), e.user, e.action, e.target, e.detail)
                    for e in session.scalars(query)]


def _user(user: WebUser) -> UserRecord:
    return UserRecord(user.id, user.name, user.role.value, _iso(user.created_at), bool(user.disabled),
                      user.password_hash)


__all__ = ["AccountError", "AccountStore"]
