"""The dashboard's files (cloud_hub/dashboard/static, in the package): ``GET /`` and ``GET /static/{path}``,
without a token: they hold no data (the page asks for a token and calls the API with it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, Response

from cloud_hub.api.routing import route
from cloud_hub.auth import PUBLIC
from cloud_hub.errors import NotFound

if TYPE_CHECKING:
    from cloud_hub.admin import AdminApi

STATIC = Path(__file__).resolve().parents[1] / "dashboard" / "static"
NOT_INSTALLED = ("<!doctype html><html lang=en><meta charset=utf-8><title>edgefed hub</title>"
                 "<p>The dashboard is not installed with this hub (no cloud_hub/dashboard/static). The admin API "
                 "is at <a href=/v1/openapi.json>/v1/openapi.json</a>.</p></html>")  # fmt: skip
_HTML = {200: {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}
_FILE = {200: {"description": "A file of the dashboard", "content": {"*/*": {"schema": {"type": "string"}}}}}
_NO_CACHE = {"Cache-Control": "no-cache"}  # revalidated each load: a hub upgrade shows at once


def static_file(root: Path, path: str) -> Path:
    """``path`` inside ``root``, or NotFound (never a file outside it)."""
    try:
        found = (root / path).resolve()
        if found.is_relative_to(root) and found.is_file():
            return found
    except (OSError, ValueError):  # a name too long, a NUL byte
        pass
    raise NotFound(f"no dashboard file {path!r}")


def add(routes: APIRouter, api: AdminApi, root: Path = STATIC) -> None:
    """Add this area's routes to ``routes`` (the app's router)."""
    root = root.resolve()

    @route(routes, "GET", "/", PUBLIC, responses=_HTML, response_class=HTMLResponse, summary="The dashboard")
    def index() -> Response:
        page = root / "index.html"
        if not page.is_file():
            return HTMLResponse(NOT_INSTALLED, headers=_NO_CACHE)
        return FileResponse(page, media_type="text/html", headers=_NO_CACHE)

    @route(routes, "GET", "/static/{path:path}", PUBLIC, responses=_FILE, summary="The dashboard's files")
    def static(path: str) -> Response:
        return FileResponse(static_file(root, path), headers=_NO_CACHE)
