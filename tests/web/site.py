"""Helpers of the web tests: the users' passwords, the PHI that must never show in a URL, logging
in, audit rows."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient
from sqlalchemy import select

from db.models import AuditEvent

PASSWORDS = {"ann": ("archivist", "ann-archivist-1"), "cleo": ("clinician", "cleo-clinician-1"),
             "ada": ("admin", "ada-admin-pass-1")}
PHI = ["P100", "P200", "P300", "DOE^JANE", "ROE^RICHARD", "19700101", "19550505", "HOSP-A", "HOSP-B"]


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
