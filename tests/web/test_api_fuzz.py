"""The JSON API fuzzed from its own OpenAPI schema with schemathesis, as a logged-in admin.

The schema is fetched from /api/openapi.json by a session that logged in through POST
/api/login, and every generated request carries that session's cookie and CSRF header. Each
operation gets EXAMPLES schema-valid and EXAMPLES schema-violating requests, derandomized, so a
run is the same every time. Every answer must not be a 5xx, must match the schema (status,
content type, body, documented headers) and must carry the security headers.

schemathesis' own pytest integration (`schemathesis.pytest.from_fixture`) cannot run here: it
reads `request.node._nodeid`, which pytest 9.2 no longer has. So its Python API is used instead:
one Hypothesis strategy per operation (`APIOperation.as_strategy`), sent by schemathesis' ASGI
transport (`case.call`) and checked by its default checks (`case.validate_response`).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.web.site import PASSWORDS, client

EXAMPLES = 20
SECURITY_HEADERS = {"content-security-policy": "frame-ancestors 'none'", "x-frame-options": "DENY",
                    "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
                    "cache-control": "no-store"}
OPERATIONS = ["GET /api/session", "POST /api/login", "GET /api/dashboard", "GET /api/links",
              "GET /api/links/{link_id}", "POST /api/links/{link_id}/review",
              "GET /api/patients/{patient_pk}/priors", "POST /api/patients/search", "GET /api/audit"]
# Logging out would end the fuzzing session: every later case would only test the 401 path.
NOT_FUZZED = {"POST /api/logout"}
# Nothing to get wrong in these: schema-violating requests are generated for the others only.
NO_INPUTS = {"GET /api/session", "GET /api/dashboard"}
RUNS = [(op, GenerationMode.POSITIVE) for op in OPERATIONS] + \
       [(op, GenerationMode.NEGATIVE) for op in OPERATIONS if op not in NO_INPUTS]


@pytest.fixture
def admin_session(site) -> dict:
    """Cookies and CSRF header of an admin logged in through the real login flow."""
    c = client(site)
    token = c.get("/api/session").json()["csrf_token"]
    answer = c.post("/api/login", json={"name": "ada", "password": PASSWORDS["ada"][1]},
                    headers={"X-CSRF-Token": token})
    assert answer.status_code == 200, answer.text
    return {"cookies": dict(c.cookies), "headers": {"X-CSRF-Token": answer.json()["csrf_token"]}}


@pytest.fixture
def api_schema(site, admin_session):
    cookie = "; ".join(f"{k}={v}" for k, v in admin_session["cookies"].items())
    return schemathesis.openapi.from_asgi("/api/openapi.json", site["app"], headers={"Cookie": cookie})


def test_every_api_operation_is_fuzzed(api_schema):
    operations = {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in api_schema.get_all_operations())}
    assert set(operations) == set(OPERATIONS) | NOT_FUZZED
    assert {name for name, op in operations.items() if not _has_inputs(op)} == NO_INPUTS | NOT_FUZZED


@pytest.mark.parametrize(("operation", "mode"), RUNS, ids=[f"{op} {mode}" for op, mode in RUNS])
def test_api_answers_match_the_schema_and_are_never_5xx(api_schema, admin_session, operation, mode):
    method, path = operation.split()
    api_operation = api_schema[path][method]
    statuses = []

    @given(case=api_operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case):
        response = case.call(**admin_session)
        statuses.append(response.status_code)
        for name, part in SECURITY_HEADERS.items():
            assert part in " ".join(response.headers.get(name, [])), (name, case.method, case.formatted_path)
        case.validate_response(response)

    fuzz()
    assert statuses and max(statuses) < 500
    if operation != "POST /api/login":          # the session held: nothing was fuzzed logged out
        assert 401 not in statuses


def _has_inputs(operation) -> bool:
    return bool(list(operation.iter_parameters())) or bool(operation.body)
