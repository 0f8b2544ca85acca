"""Error answers of the JSON API, as the OpenAPI schema documents them, and the path id type.

Every error the API answers is `{"detail": "..."}`; a request that fails validation gets
`{"detail": "invalid request: ...", "fields": [...]}` (never the input echoed back: it may
hold identifiers). Routes list the statuses they can answer with `responses=errors(...)`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path
from pydantic import BaseModel, Field

# Ids are 64-bit signed integers in SQLite and PostgreSQL; a larger one in a path would overflow
# the database driver (a 500), so it is refused as invalid before any query.
ROW_ID_MAX = 2 ** 63 - 1
RowId = Annotated[int, Path(ge=1, le=ROW_ID_MAX, description="an internal id (1 to 2^63-1)")]


class ErrorBody(BaseModel):
    detail: str = Field(description="what went wrong, for people")


class InvalidRequest(BaseModel):
    detail: str = Field(description="'invalid request: ' and, per field, what is wrong with it")
    fields: list[str] = Field(description="the invalid fields, as location.name (path.link_id, body.name)")


RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again",
                               "schema": {"type": "integer"}}}
_WHY = {
    400: "the body cannot be parsed (not UTF-8 JSON)",
    401: "not logged in (the login route: wrong name or password, or too many failed logins)",
    403: "no or a wrong CSRF token, or a role without this right",
    404: "no such item",
    409: "the change conflicts with the item's state (a link already decided)",
    422: "the request does not match the schema",
    500: "an unexpected error (logged on the server)",
    503: "every password-check slot is busy: try again after Retry-After seconds",
}


def errors(*codes: int) -> dict[int | str, dict]:
    """`responses=` for a route: the error statuses it can answer, with their bodies."""
    out: dict[int | str, dict] = {}
    for code in (*codes, 500):
        out[code] = {"model": InvalidRequest if code == 422 else ErrorBody, "description": _WHY[code]}
        if code == 503:
            out[code]["headers"] = RETRY_AFTER
    return out


def validation_detail(errors_: list[dict]) -> tuple[str, list[str]]:
    """The message and field list for a RequestValidationError: pydantic's messages name the
    rule broken, not the value sent."""
    fields = sorted({".".join(str(p) for p in e["loc"]) for e in errors_})
    reasons = sorted({f"{'.'.join(str(p) for p in e['loc'])}: {e.get('msg', 'invalid')}" for e in errors_})
    return "invalid request: " + "; ".join(reasons), fields
