"""How a route of the admin API declares who may call it and how large a body it takes.

Every route is added with :func:`route`, which records its lowest role (``cloud_hub.auth``) and body
limit in the route's OpenAPI entry (``x-role``, ``x-max-body-bytes``): the gate (gate.py) reads them from
the matched route, the OpenAPI document shows them, and :func:`routes_of` lists them for tests. A route
added any other way has no role: the gate refuses it to all but operators and the role test fails.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.routing import BaseRoute

from cloud_hub.auth import PUBLIC

JSON_BODY_BYTES = 1 << 20  # the limit on a JSON request body
ENROLL_BODY_BYTES = 16 * 1024  # /v1/enroll: the one route anyone may call
UPLOAD = "upload"  # x-max-body-bytes of the artifact upload: the hub's --max-upload-bytes
ROLE_KEY, LIMIT_KEY = "x-role", "x-max-body-bytes"


class HubJSON(JSONResponse):
    """JSON as the hub always wrote it: anything JSON cannot say written as its str()."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, default=str).encode()


@dataclass(frozen=True)
class Route:
    """One method of one route: ``path`` as declared (``/v1/models/{name}``), ``role`` the lowest role that
    may call it (None: undeclared), ``max_body`` bytes a request body may have (``UPLOAD``: the hub's
    upload limit), ``route`` the framework's route."""

    method: str
    path: str
    role: str | None
    max_body: int | str
    route: BaseRoute

    @property
    def operator(self) -> bool:  # kept for callers of the old route table
        return self.role != PUBLIC


def route(router: APIRouter, method: str, path: str, role: str, *, max_body: int | str | None = None,
          **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:  # fmt: skip
    """``@route(router, "GET", "/v1/devices", VIEWER)``: an endpoint with its role and body limit (default:
    1 MiB for a POST, no body otherwise)."""
    limit = max_body if max_body is not None else (JSON_BODY_BYTES if method == "POST" else 0)
    extra: dict[str, Any] = {ROLE_KEY: role, LIMIT_KEY: limit, **options.pop("openapi_extra", {})}
    if role == PUBLIC:
        extra["security"] = []
    options.setdefault("response_model", None)  # replies are written as they are, never re-validated
    status = int(options.get("status_code") or 200)
    add = router.api_route(path, methods=[method], openapi_extra=extra, **options)
    return lambda endpoint: add(_written_as_json(endpoint, status))


def _written_as_json(endpoint: Callable[..., Any], status: int) -> Callable[..., Any]:
    """``endpoint`` with its reply already a ``HubJSON`` response: FastAPI would otherwise pass a plain
    value through ``jsonable_encoder`` first, which walks it object by object (100 ms for the 1,000
    devices of ``GET /v1/devices``; ``json.dumps`` takes 7). Signature and docs stay the endpoint's."""

    def reply(value: Any) -> Any:
        return value if isinstance(value, Response) else HubJSON(value, status_code=status)

    if inspect.iscoroutinefunction(endpoint):

        @functools.wraps(endpoint)
        async def answer_async(*args: Any, **kwargs: Any) -> Any:
            return reply(await endpoint(*args, **kwargs))

        return answer_async

    @functools.wraps(endpoint)
    def answer(*args: Any, **kwargs: Any) -> Any:
        return reply(endpoint(*args, **kwargs))

    return answer


def describe(candidate: BaseRoute) -> list[Route]:
    """The methods of one framework route with their declarations (role None where there is none)."""
    if not isinstance(candidate, APIRoute):
        path = getattr(candidate, "path", repr(candidate))
        return [Route(m, path, None, 0, candidate) for m in sorted(getattr(candidate, "methods", None) or {"GET"})]
    extra = candidate.openapi_extra or {}
    role, limit = extra.get(ROLE_KEY), extra.get(LIMIT_KEY, 0)
    methods = sorted((candidate.methods or set()) - {"HEAD"}) or ["GET"]
    return [Route(m, candidate.path_format, role, limit, candidate) for m in methods]


def routes_of(app: FastAPI) -> list[Route]:
    """Every route the app serves, one entry per method."""
    return [entry for candidate in app.router.routes for entry in describe(candidate)]
