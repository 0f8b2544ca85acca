"""The Jinja2 templates of the pages and `render`, shared by the application, the pages and the API."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

from fastapi import Request
from fastapi.responses import Response
from fastapi.templating import Jinja2Templates

from web.auth import csrf_token

__version__ = version("dicom-node")
templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
templates.env.globals["version"] = __version__


def render(request: Request, template: str, user=None, status_code: int = 200, **context) -> Response:
    context.update(user=user, csrf_token=csrf_token(request), path=request.url.path)
    return templates.TemplateResponse(request, template, context, status_code=status_code)
