"""The FastAPI application: pages (`web.pages`), JSON API (`web.api`), DICOMweb (`web.dicomweb`),
sessions, headers.

`create_app(settings, engine, secret)` is what `serve` runs under uvicorn (`web.server`)
and what the tests drive with FastAPI's TestClient.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import Engine
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware

from dicom_node.config import Settings
from web.auth import LoginRequired, SessionGuard, csrf_guard
from web.errors import validation_detail
from web.services import WebContext
from web.templating import __version__, render

log = logging.getLogger("dicom_node.web")
HERE = Path(__file__).parent

# No inline scripts or styles anywhere: every script and stylesheet is a file under /static.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def create_app(settings: Settings, engine: Engine, secret: str) -> FastAPI:
    from web import api, dicomweb, pages

    app = FastAPI(title="dicom-node web API", version=__version__,
                  description="The data behind the web pages. Session cookie auth (log in with "
                              "POST /api/login); every POST carries the session's CSRF token in the "
                              "X-CSRF-Token header (GET /api/session gives it).",
                  docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(csrf_guard)])
    app.state.ctx = WebContext(settings, engine)
    app.state.guard = SessionGuard(settings.web.session_lifetime_s, app.state.ctx.accounts,
                                   settings.web.max_concurrent_password_checks)
    secure = settings.web.tls_cert_file is not None or settings.web.secure_cookies
    app.state.secure = secure

    # Middleware added later runs earlier: the session exists for the routes, and the headers
    # middleware, outermost, sees every answer (with the session cookie, and 500s too).
    app.add_middleware(SessionMiddleware, secret_key=secret, session_cookie="dicomnode_session",
                       max_age=settings.web.session_lifetime_s, same_site="lax", https_only=secure)
    app.add_middleware(SecurityHeaders, secure=secure)

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, _exc: LoginRequired):
        if _is_api(request):
            return JSONResponse({"detail": "log in first"}, status_code=401)
        if request.method == "GET" and not request.url.path.startswith("/thumbnails/"):
            request.session["next"] = request.url.path      # a path of internal ids, never a query
        return RedirectResponse("/login", status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if _is_api(request) or exc.status_code < 400:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return render(request, "error.html", status_code=exc.status_code, status=exc.status_code,
                      message=exc.detail)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        # The default answer echoes the input back; it may hold identifiers.
        detail, fields = validation_detail(exc.errors())
        if _is_api(request):
            return JSONResponse({"detail": detail, "fields": fields}, status_code=422)
        return render(request, "error.html", status_code=422, status=422, message=detail)

    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.include_router(pages.router)
    app.include_router(api.router)
    app.include_router(dicomweb.router)
    return app


def _is_api(request: Request) -> bool:
    """JSON answers for the API; the API's docs page is a page like the others."""
    return _is_api_path(request.url.path)


def _is_api_path(path: str) -> bool:
    """JSON errors, never pages or redirects: the API and DICOMweb (whose clients are viewers)."""
    return (path.startswith("/api/") and path != "/api/docs") or path.startswith("/dicomweb/")


def security_headers(path: str, secure: bool) -> list[tuple[bytes, bytes]]:
    headers = [("Content-Security-Policy", CSP), ("X-Frame-Options", "DENY"), ("X-Content-Type-Options", "nosniff"),
               ("Referrer-Policy", "no-referrer"), ("Cross-Origin-Opener-Policy", "same-origin"),
               ("Permissions-Policy", "camera=(), microphone=(), geolocation=()")]
    if path.startswith("/static/"):
        headers.append(("Cache-Control", "public, max-age=3600"))
    else:   # every page and image may show patient data: never kept by a browser or proxy
        headers += [("Cache-Control", "no-store"), ("Pragma", "no-cache")]
    if secure:
        headers.append(("Strict-Transport-Security", "max-age=31536000"))
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]


class SecurityHeaders:
    """Pure ASGI middleware, outermost: the security headers on every answer, and an unhandled
    error turned into a plain 500 that carries them too. (An `exception_handler(Exception)`
    answers from Starlette's ServerErrorMiddleware, outside every other middleware, so its
    answer would go out bare; and it re-raises, so the server would log the error a second time.)"""

    def __init__(self, app, secure: bool) -> None:
        self.app, self.secure = app, secure

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ours = security_headers(scope["path"], self.secure)
        names = {k for k, _ in ours}
        started = False

        async def send_with_headers(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": kept + ours}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            if started:         # too late for another answer: the server closes the connection and logs it
                raise
            log.exception("unhandled error answering %s %s", scope["method"], scope["path"])
            if _is_api_path(scope["path"]):
                answer: Response = JSONResponse({"detail": "internal server error"}, status_code=500)
            else:
                answer = PlainTextResponse("500: internal server error (it has been logged)", status_code=500)
            await answer(scope, receive, send_with_headers)
