"""The admin API's FastAPI app: its routers, its JSON errors and its OpenAPI document.

Replies are JSON (``json.dumps(value, default=str)``, as the hub always wrote them); errors are
``{"error": message}``: 400 bad input (a body that does not fit its model names the field), 401 no,
unknown or revoked token, 403 a role too low or enrollment refused, 404 unknown, 409 conflict, 411/413 a
body without a length or over the route's limit, 500 "internal error; see the hub log".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException

from cloud_hub.api import access, dashboard, deployments, devices, events, models, observe
from cloud_hub.api.gate import Gate
from cloud_hub.api.routing import LIMIT_KEY, ROLE_KEY, HubJSON
from edge_agent import __version__

if TYPE_CHECKING:
    from cloud_hub.admin import AdminApi

TITLE = "edgefed hub admin API"
_ERRORS = {
    "400": "Bad input: the message names the field or the cause",
    "401": "Missing, unknown or revoked token",
    "403": "The token's role may not call this route (the message names the role needed)",
    "404": "Unknown",
    "409": "Conflict",
}
_BODY_ERRORS = {"411": "No Content-Length (chunked bodies are refused)", "413": "Body over this route's size limit"}


def validation_message(errors: list[Any]) -> str:
    """The first problem of a request that does not fit its models, naming the field."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return "the request body is not JSON"
    where = [str(p) for p in first.get("loc", ())]
    if where and where[0] in ("body", "query", "path", "header"):
        where = where[1:]
    if not where:
        return "the request body must be a JSON object" + (" (it is empty)" if first.get("type") == "missing" else "")
    return f"field {'.'.join(where)!r}: {first.get('msg', 'invalid')}"


class AdminApp(FastAPI):
    """FastAPI with the document's security scheme, roles and error replies written in."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            document = get_openapi(title=TITLE, version=__version__, description=__doc__, routes=self.routes)
            schemas = document.setdefault("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            document["components"]["securitySchemes"] = {"token": {"type": "http", "scheme": "bearer"}}
            document["security"] = [{"token": []}]
            error = {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}}}}}
            for operations in document.get("paths", {}).values():
                for operation in operations.values():
                    replies = operation.setdefault("responses", {})
                    replies.pop("422", None)
                    public = operation.get(ROLE_KEY) == "public"
                    wanted = {k: v for k, v in _ERRORS.items() if not public or k not in ("401", "403")}
                    if operation.get(LIMIT_KEY):
                        wanted.update(_BODY_ERRORS)
                    for code, text in wanted.items():
                        replies.setdefault(code, {"description": text, "content": error})
            self.openapi_schema = document
        return self.openapi_schema


def create_app(api: AdminApi) -> AdminApp:
    """The app of one ``AdminApi`` (its hub, tokens and settings); requests pass its Gate first."""
    app = AdminApp(title=TITLE, version=__version__, openapi_url=None, docs_url=None, redoc_url=None,
                   default_response_class=HubJSON)  # fmt: skip
    for module in (access, models, devices, deployments, observe, events, dashboard):
        module.add(app.router, api)  # on the app's own router: every route is an APIRoute with its role

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> HubJSON:
        return HubJSON({"error": validation_message(list(exc.errors()))}, status_code=400)

    @app.exception_handler(HTTPException)
    async def refused(request: Request, exc: HTTPException) -> HubJSON:
        return HubJSON({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    app.add_middleware(Gate, api=api)
    return app
