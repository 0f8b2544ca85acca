"""The FastAPI application: pages (`web.pages`), JSON API (`web.api`), sessions, headers.

`create_app(settings, engine, secret)` is what `serve` runs under uvicorn (`web.server`)
and what the tests drive with FastAPI's TestClient.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import Engine
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware

from dicom_node import __version__
from dicom_node.config import Settings
from web.auth import LoginRequired, SessionGuard, csrf_guard, csrf_token
from web.services import WebContext

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.globals["version"] = __version__

# No inline scripts or styles anywhere: every script and stylesheet is a file under /static.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def render(request: Request, template: str, user=None, status_code: int = 200, **context) -> Response:
    context.update(user=user, csrf_token=csrf_token(request), path=request.url.path)
    return templates.TemplateResponse(request, template, context, status_code=status_code)


def create_app(settings: Settings, engine: Engine, secret: str) -> FastAPI:
    from web import api, pages

    app = FastAPI(title="dicom-node web API", version=__version__,
                  description="The data behind the web pages. Session cookie auth (log in with "
                              "POST /api/login); every POST carries the session's CSRF token in the "
                              "X-CSRF-Token header (GET /api/session gives it).",
                  docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(csrf_guard)])
    app.state.ctx = WebContext(settings, engine)
    app.state.guard = SessionGuard(settings.web.session_lifetime_s, app.state.ctx.accounts)
    secure = settings.web.tls_cert_file is not None or settings.web.secure_cookies
    app.state.secure = secure

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        headers = response.headers
        headers["Content-Security-Policy"] = CSP
        headers["X-Frame-Options"] = "DENY"
        headers["X-Content-Type-Options"] = "nosniff"
        headers["Referrer-Policy"] = "no-referrer"
        headers["Cross-Origin-Opener-Policy"] = "same-origin"
        headers["Permissions-Policy"] = "camera=(), microphone=(), geolocation=()"
        if request.url.path.startswith("/static/"):
            headers["Cache-Control"] = "public, max-age=3600"
        else:   # every page and image may show patient data: never kept by a browser or proxy
            headers["Cache-Control"] = "no-store"
            headers["Pragma"] = "no-cache"
        if secure:
            headers["Strict-Transport-Security"] = "max-age=31536000"
        return response

    # Added last so it runs first: the session exists for the headers middleware and routes.
    app.add_middleware(SessionMiddleware, secret_key=secret, session_cookie="dicomnode_session",
                       max_age=settings.web.session_lifetime_s, same_site="lax", https_only=secure)

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
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
        if _is_api(request):
            return JSONResponse({"detail": "invalid request", "fields": fields}, status_code=422)
        return render(request, "error.html", status_code=422, status=422,
                      message="invalid request: " + ", ".join(fields))

    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.include_router(pages.router)
    app.include_router(api.router)
    return app


def _is_api(request: Request) -> bool:
    """JSON answers for the API; the API's docs page is a page like the others."""
    return request.url.path.startswith("/api/") and request.url.path != "/api/docs"
