"""The HTML pages. URLs carry internal ids only (link id, patient pk, series pk): never a
Patient ID or a name, in a path or a query string. A patient is found by a POSTed search
form. Every page that shows patient data writes an audit event."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import RedirectResponse, Response

from web import services
from web.auth import CurrentUser, LoginRefused, admin, any_user, log_in, log_out, reviewer
from web.errors import RowId
from web.services import Conflict, NotFound
from web.templating import render

router = APIRouter(include_in_schema=False)


def _ctx(request: Request):
    return request.app.state.ctx


def _render(request, template, user, status_code=200, **context):

    return render(request, template, user, status_code=status_code, **context)


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


# ----- login -------------------------------------------------------------------------------

@router.get("/login")
def login_page(request: Request):
    return _render(request, "login.html", None)


@router.post("/login")
def login(request: Request, name: str = Form(""), password: str = Form("")):
    outcome = log_in(request, name, password)
    if isinstance(outcome, LoginRefused):
        page = _render(request, "login.html", None, status_code=outcome.status, error=outcome.message, name=name[:64])
        page.headers.update(outcome.headers)
        return page
    return _see_other(request.session.pop("next", None) or "/")


@router.post("/logout")
def logout(request: Request):
    log_out(request)
    return _see_other("/login")


# ----- dashboard and queue -----------------------------------------------------------------

@router.get("/")
def dashboard(request: Request, user: CurrentUser = Depends(any_user)):
    stats = services.dashboard(_ctx(request))
    peak = max((h["count"] for h in stats["instances_per_hour"]), default=0) or 1
    return _render(request, "dashboard.html", user, stats=stats, peak=peak)


@router.get("/queue")
def review_queue(request: Request, user: CurrentUser = Depends(any_user)):
    items = services.queue(_ctx(request))
    _ctx(request).accounts.audit(user.name, "view_queue", "queue", {"links": len(items)})
    return _render(request, "queue.html", user, items=items, worth_a_look=False)


@router.get("/queue/worth-a-look")
def worth_a_look_queue(request: Request, user: CurrentUser = Depends(any_user)):
    """Open links below the review band, most probable first (weak evidence, not flags)."""
    items = services.queue(_ctx(request), worth_a_look=True)
    _ctx(request).accounts.audit(user.name, "view_queue", "queue/worth-a-look", {"links": len(items)})
    return _render(request, "queue.html", user, items=items, worth_a_look=True)


# ----- one link ----------------------------------------------------------------------------

@router.get("/links/{link_id}")
def review_page(request: Request, link_id: RowId, user: CurrentUser = Depends(any_user)):
    ctx = _ctx(request)
    try:
        item = services.review_item(ctx, link_id)
    except NotFound:
        raise HTTPException(404, "no such link") from None
    ctx.accounts.audit(user.name, "view_link", f"link:{link_id}",
                       {"studies": [s["study_pk"] for s in item["sides"]]})
    return _render(request, "review.html", user, item=item, link=item["link"])


@router.post("/links/{link_id}/review")
def review(request: Request, link_id: RowId, decision: str = Form(...), note: str = Form(""),
           user: CurrentUser = Depends(reviewer)):
    if decision not in ("confirm", "reject", "reopen"):
        raise HTTPException(422, "decision is confirm, reject or reopen")
    try:
        outcome = services.decide(_ctx(request), link_id, decision, user.name, note[:2000])
    except NotFound:
        raise HTTPException(404, "no such link") from None
    except Conflict as error:
        raise HTTPException(409, str(error)) from None
    if decision == "reopen" or outcome["next"] is None:
        return _see_other(f"/links/{link_id}" if decision == "reopen" else "/queue")
    return _see_other(f"/links/{outcome['next']}")


@router.get("/thumbnails/series/{series_pk}.png")
def thumbnail(request: Request, series_pk: RowId, user: CurrentUser = Depends(any_user)):
    from web.thumbnails import ThumbnailError

    try:
        data = _ctx(request).thumbnails.png(series_pk)
    except ThumbnailError:
        raise HTTPException(404, "this series has no image to show") from None
    if data is None:
        raise HTTPException(404, "no such series")
    return Response(data, media_type="image/png")


# ----- patients ----------------------------------------------------------------------------

@router.get("/patients/{patient_pk}")
def patient_timeline(request: Request, patient_pk: RowId, user: CurrentUser = Depends(any_user)):
    ctx = _ctx(request)
    try:
        result = services.timeline(ctx, patient_pk)
    except NotFound:
        raise HTTPException(404, "no such patient") from None
    ctx.accounts.audit(user.name, "view_timeline", f"patient:{patient_pk}",
                       {"patients": sorted(i["patient_pk"] for i in result["ids"] if i["patient_pk"]),
                        "studies": len(result["studies"])})
    return _render(request, "timeline.html", user, result=result)


@router.get("/search")
def search_page(request: Request, user: CurrentUser = Depends(any_user)):
    return _render(request, "search.html", user, results=None)


@router.post("/search")
def search(request: Request, patient_id: str = Form(""), issuer: str = Form(""), name: str = Form(""),
           user: CurrentUser = Depends(any_user)):
    ctx = _ctx(request)
    results = services.search(ctx, patient_id[:64], issuer[:128], name[:128])
    # The terms may be identifiers: the audit keeps which patients were found, not what was typed.
    ctx.accounts.audit(user.name, "search", "patients",
                       {"by": [k for k, v in (("patient_id", patient_id), ("issuer", issuer), ("name", name)) if v],
                        "patients": [r["patient_pk"] for r in results]})
    if len(results) == 1:
        return _see_other(f"/patients/{results[0]['patient_pk']}")
    return _render(request, "search.html", user, results=results)


# ----- admin -------------------------------------------------------------------------------

@router.get("/audit")
def audit_page(request: Request, user: CurrentUser = Depends(admin)):
    log = services.audit_log(_ctx(request))
    return _render(request, "audit.html", user, log=log)


@router.get("/users")
def users_page(request: Request, user: CurrentUser = Depends(admin)):
    return _render(request, "users.html", user, users=services.users(_ctx(request)))


@router.post("/users")
def add_user(request: Request, name: str = Form(...), role: str = Form(...), password: str = Form(...),
             user: CurrentUser = Depends(admin)):
    from db.accounts import AccountError
    from web.passwords import PasswordError, hash_password

    ctx = _ctx(request)
    try:
        added = ctx.accounts.add_user(name, hash_password(password), role)
    except (AccountError, PasswordError) as error:
        return _render(request, "users.html", user, status_code=400, users=services.users(ctx), error=str(error))
    ctx.accounts.audit(user.name, "user_add", f"user:{added.id}", {"role": added.role})
    return _see_other("/users")


@router.post("/users/{user_id}/disabled")
def set_disabled(request: Request, user_id: RowId, disabled: str = Form(...), user: CurrentUser = Depends(admin)):
    ctx = _ctx(request)
    target = ctx.accounts.user(user_id=user_id)
    if target is None:
        raise HTTPException(404, "no such user")
    if target.name == user.name:
        raise HTTPException(409, "you cannot disable your own account")
    changed = ctx.accounts.set_disabled(target.name, disabled == "1")
    ctx.accounts.audit(user.name, "user_disable" if changed.disabled else "user_enable", f"user:{user_id}")
    return _see_other("/users")
