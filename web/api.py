"""The JSON API behind the pages, under /api/.

Auth is the pages' session cookie: log in with POST /api/login (or the login form), then
send the session's CSRF token as the `X-CSRF-Token` header with every POST
(GET /api/session returns it, and creates the session it belongs to). Roles are the
pages': clinicians read, archivists also review, admins also read the audit log. Patient
identifiers travel only in JSON bodies, never in URLs. The schema is at /api/openapi.json
and rendered at /api/docs, for logged-in users only.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from web import services
from web.auth import CurrentUser, LoginRefused, admin, any_user, csrf_token, log_in, log_out, reviewer
from web.errors import RowId, errors
from web.templating import render

router = APIRouter(prefix="/api", tags=["api"])


class Login(BaseModel):
    name: str = Field(max_length=64)
    password: str = Field(max_length=1024)


class Review(BaseModel):
    decision: Literal["confirm", "reject", "reopen"]
    note: str | None = Field(None, max_length=2000)


class PatientSearch(BaseModel):
    patient_id: str | None = Field(None, max_length=64, description="exact Patient ID")
    issuer: str | None = Field(None, max_length=128, description="Issuer of Patient ID (with patient_id)")
    name: str | None = Field(None, max_length=128, description="part of the patient's name")


def _ctx(request: Request):
    return request.app.state.ctx


@router.get("/session", summary="The current user (if any) and the CSRF token for POSTs", responses=errors())
def session(request: Request):
    token = csrf_token(request)
    name = request.session.get("user")
    user = _ctx(request).accounts.user(name) if name else None
    return {"user": user.name if user and not user.disabled else None,
            "role": user.role if user and not user.disabled else None, "csrf_token": token}


@router.post("/login", summary="Log in; the answer sets the session cookie and a new CSRF token",
             responses=errors(400, 401, 403, 422, 503))
def login(request: Request, body: Login):
    outcome = log_in(request, body.name, body.password)
    if isinstance(outcome, LoginRefused):
        return JSONResponse({"detail": outcome.message}, status_code=outcome.status, headers=outcome.headers)
    request.session.pop("next", None)
    return {"user": outcome.name, "role": outcome.role, "csrf_token": request.session["csrf"]}


@router.post("/logout", summary="End the session", responses=errors(403))
def logout(request: Request):
    log_out(request)
    return {"ok": True}


@router.get("/dashboard", summary="Instances per hour (24 h), series by state, models, open flags",
            responses=errors(401))
def dashboard(request: Request, user: CurrentUser = Depends(any_user)):
    return services.dashboard(_ctx(request))


@router.get("/links", summary="Links, most probable first (status open by default)", responses=errors(401, 422))
def links(request: Request, status: Literal["open", "confirmed", "rejected", "all"] = "open",
          user: CurrentUser = Depends(any_user)):
    ctx = _ctx(request)
    views = ctx.links.list(status=None if status == "all" else status)
    ctx.accounts.audit(user.name, "api_list_links", "links", {"status": status, "links": len(views)})
    return [v.to_json() for v in views]


@router.get("/links/{link_id}", summary="One link: both studies, evidence, history, queue neighbours",
            responses=errors(401, 404, 422))
def link(request: Request, link_id: RowId, user: CurrentUser = Depends(any_user)):
    ctx = _ctx(request)
    try:
        item = services.review_item(ctx, link_id)
    except services.NotFound:
        raise HTTPException(404, "no such link") from None
    ctx.accounts.audit(user.name, "api_view_link", f"link:{link_id}")
    return item


@router.post("/links/{link_id}/review", summary="Confirm, reject or reopen a link (archivist or admin)",
             responses=errors(400, 401, 403, 404, 409, 422))
def review(request: Request, link_id: RowId, body: Review, user: CurrentUser = Depends(reviewer)):
    try:
        return services.decide(_ctx(request), link_id, body.decision, user.name, body.note)
    except services.NotFound:
        raise HTTPException(404, "no such link") from None
    except services.Conflict as error:
        raise HTTPException(409, str(error)) from None


@router.get("/patients/{patient_pk}/priors",
            summary="A person's timeline across IDs joined by confirmed links (linkage.priors)",
            responses=errors(401, 404, 422))
def priors(request: Request, patient_pk: RowId, user: CurrentUser = Depends(any_user)):
    ctx = _ctx(request)
    try:
        result = services.timeline(ctx, patient_pk)
    except services.NotFound:
        raise HTTPException(404, "no such patient") from None
    ctx.accounts.audit(user.name, "api_view_timeline", f"patient:{patient_pk}")
    return result


@router.post("/patients/search", summary="Patients by exact Patient ID (and issuer) or part of a name",
             responses=errors(400, 401, 403, 422))
def search(request: Request, body: PatientSearch, user: CurrentUser = Depends(any_user)):
    ctx = _ctx(request)
    results = services.search(ctx, body.patient_id, body.issuer, body.name)
    ctx.accounts.audit(user.name, "api_search", "patients", {"patients": [r["patient_pk"] for r in results]})
    return results


@router.get("/audit", summary="The web audit trail and the link events, newest first (admin)",
            responses=errors(401, 403, 422))
def audit(request: Request, limit: int = 200, user: CurrentUser = Depends(admin)):
    return services.audit_log(_ctx(request), max(1, min(limit, 5000)))


@router.get("/openapi.json", include_in_schema=False)
def openapi(request: Request, user: CurrentUser = Depends(any_user)):
    return request.app.openapi()


@router.get("/docs", include_in_schema=False)
def docs(request: Request, user: CurrentUser = Depends(any_user)):

    schema = request.app.openapi()
    operations = [{"method": method.upper(), "path": path, "summary": op.get("summary", ""),
                   "parameters": [p["name"] for p in op.get("parameters", [])],
                   "body": _body_schema(schema, op)}
                  for path, methods in schema["paths"].items() for method, op in methods.items()]
    return render(request, "api_docs.html", user, schema=schema, operations=operations)


def _body_schema(schema: dict, op: dict) -> list[str]:
    content = (op.get("requestBody") or {}).get("content", {}).get("application/json", {})
    ref = content.get("schema", {}).get("$ref", "")
    model = schema.get("components", {}).get("schemas", {}).get(ref.rsplit("/", 1)[-1], {}) if ref else {}
    return list(model.get("properties", {}))
