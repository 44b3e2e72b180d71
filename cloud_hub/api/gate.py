"""The gate every admin request passes before its endpoint: it finds the route, authenticates the bearer
token and checks the route's role, checks the declared body size, sets ``cloud_hub.auth.ACTOR``, turns
the hub's exceptions into JSON errors, and writes every non-GET request (refused or not) to the audit log.

It is plain ASGI middleware rather than a FastAPI dependency on purpose: FastAPI reads and parses a
request's body before it runs the route's dependencies, and a body must be refused (401, 403, 411, 413)
before a byte of it is read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud_hub.api.routing import JSON_BODY_BYTES, UPLOAD, Route, describe
from cloud_hub.auth import ACTOR, OPERATOR, PUBLIC, Principal, allows
from cloud_hub.errors import Conflict, HubError, NotFound
from device_profiles import ProfileError
from edge_agent.protocol.errors import ArtifactRejected

if TYPE_CHECKING:
    from cloud_hub.admin import AdminApi

log = logging.getLogger("cloud_hub.admin")
BAD_CONTENT_LENGTH = "x-edgefed-bad-content-length"  # set by serve.GuardedH11 for a malformed Content-Length
PRINCIPAL = "principal"  # the caller, in the request's state (request.state.principal)
# body and reply fields an audit entry keeps as the change's targets (never a token)
_AUDIT_KEYS = ("model", "version", "target", "a", "b", "split", "strategy", "name", "role", "device_id", "groups",
               "tags", "by", "id", "deployment_id", "artifact_id", "key_id", "retired_key_id")  # fmt: skip
UNAUTHORIZED = ("missing, unknown or revoked admin token: pass --token (or EDGEFED_HUB_TOKEN) with a token from "
                "'cloud-hub tokens create', or --state-dir for the hub's operator.token")  # fmt: skip


def error_status(exc: BaseException) -> HTTPStatus:
    """The status the hub's exceptions map to (the message is ``str(exc)``, except for 500)."""
    if isinstance(exc, NotFound):
        return HTTPStatus.NOT_FOUND
    if isinstance(exc, Conflict | ArtifactRejected):
        return HTTPStatus.CONFLICT
    if isinstance(exc, PermissionError):
        return HTTPStatus.FORBIDDEN
    if isinstance(exc, HubError | ProfileError | ValueError | KeyError):
        return HTTPStatus.BAD_REQUEST
    return HTTPStatus.INTERNAL_SERVER_ERROR


@dataclass
class Exchange:
    """What the audit entry of one request needs: the JSON body read and the reply sent."""

    status: int = 0
    started: bool = False
    body: bytearray = field(default_factory=bytearray)
    reply: bytearray = field(default_factory=bytearray)
    keep: bool = True  # still collecting the body (it stays under the JSON limit)

    def json(self, data: bytearray) -> Any:
        try:
            return json.loads(bytes(data) or b"null")
        except ValueError:
            return None


class Gate:
    """ASGI middleware around the FastAPI app of one ``AdminApi``."""

    def __init__(self, app: ASGIApp, api: AdminApi) -> None:
        self.app, self.api = app, api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        matched = self.match(scope)
        if matched is None:
            await self.reply(send, HTTPStatus.NOT_FOUND, {"error": f"no route {method} {path}"})
            return
        route, params = matched
        headers = Headers(scope=scope)
        supplied = headers.get("authorization", "").removeprefix("Bearer ").strip()
        principal = await run_in_threadpool(self.api.tokens.resolve, supplied) if supplied else None
        scope.setdefault("state", {})[PRINCIPAL] = principal
        exchange = Exchange()
        refused = self.authorize(route, principal) or self.check_length(route, headers)
        if refused is not None:
            exchange.status = refused[0]
            await self.reply(send, *refused, close=True)  # the body is never read: the connection cannot go on
            outcome: Any = refused[1]
        else:
            outcome = await self.run(scope, receive, send, route, principal, exchange)
        if method != "GET":
            await run_in_threadpool(self.audit, headers, route, path, params, principal, exchange, outcome)

    def match(self, scope: Scope) -> tuple[Route, dict[str, str]] | None:
        for candidate in self.api.app.router.routes:
            found, child = candidate.matches(scope)
            if found == Match.FULL:
                entry = next(r for r in describe(candidate) if r.method == scope["method"])
                return entry, {k: str(v) for k, v in child.get("path_params", {}).items()}
        return None

    @staticmethod
    def authorize(route: Route, principal: Principal | None) -> tuple[HTTPStatus, dict[str, str]] | None:
        """401 for a missing, unknown or revoked token, 403 for a role too low (naming the role needed)."""
        needed = route.role or OPERATOR
        if needed == PUBLIC:
            return None
        if principal is None:
            return HTTPStatus.UNAUTHORIZED, {"error": UNAUTHORIZED}
        if not allows(principal.role, needed):
            return HTTPStatus.FORBIDDEN, {"error": f"token {principal.name!r} has role {principal.role}; "
                                          f"{route.method} {route.path} needs role {needed} (or higher): ask an "
                                          "operator for such a token"}  # fmt: skip
        return None

    def limit(self, route: Route) -> int:
        return self.api.upload_limit if route.max_body == UPLOAD else int(route.max_body)

    def check_length(self, route: Route, headers: Headers) -> tuple[HTTPStatus, dict[str, str]] | None:
        """Refuse a body that is chunked, of no, a negative or a too large declared size (nothing is read)."""
        where, limit = f"{route.method} {route.path}", self.limit(route)
        if "transfer-encoding" in headers:
            return HTTPStatus.LENGTH_REQUIRED, {"error": f"{where}: chunked bodies are not accepted; send the body "
                                                "with a Content-Length header"}  # fmt: skip
        text = headers.get(BAD_CONTENT_LENGTH, headers.get("content-length"))
        if text is None:
            if route.method == "POST":
                return HTTPStatus.LENGTH_REQUIRED, {"error": f"{where} needs a Content-Length header (0 for an "
                                                    "empty body; with curl: -d '')"}  # fmt: skip
            return None
        if not text.strip().isdigit():
            return HTTPStatus.BAD_REQUEST, {"error": f"Content-Length {text!r} is not a size in bytes (a whole "
                                            "number, 0 or more)"}  # fmt: skip
        if int(text) > limit:
            takes = "takes no body" if limit == 0 else f"takes at most {limit} bytes"
            return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"{where} {takes}; this request declares {int(text)}"}
        return None

    async def run(self, scope: Scope, receive: Receive, send: Send, route: Route, principal: Principal | None,
                  exchange: Exchange) -> Any:  # fmt: skip
        """The endpoint, as the caller's ACTOR; what it replied (or the JSON error of what it raised)."""
        collect = route.method != "GET" and route.max_body != UPLOAD
        if collect and route.method == "POST":  # a JSON body whatever its Content-Type says (curl -d: a form)
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope["headers"].append((b"content-type", b"application/json"))

        async def receiving() -> Message:
            message = await receive()
            if collect and exchange.keep and message["type"] == "http.request":
                exchange.body += message.get("body", b"")
                exchange.keep = len(exchange.body) <= JSON_BODY_BYTES
            return message

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.started, exchange.status = True, message["status"]
            elif message["type"] == "http.response.body" and route.method != "GET" and len(exchange.reply) < (1 << 20):
                exchange.reply += message.get("body", b"")
            await send(message)

        acting = ACTOR.set(principal.name if principal else "anonymous")
        try:
            await self.app(scope, receiving, sending)
        except Exception as exc:
            status = error_status(exc)
            if status == HTTPStatus.INTERNAL_SERVER_ERROR:
                log.exception("admin request %s %s failed", route.method, route.path)
                reply = {"error": "internal error; see the hub log"}
            else:
                reply = {"error": str(exc)}
            exchange.status = status
            if exchange.started:  # a stream cut short: nothing more can be said
                return reply
            await self.reply(send, status, reply)
            return reply
        finally:
            ACTOR.reset(acting)
        return exchange.json(exchange.reply)

    @staticmethod
    async def reply(send: Send, status: HTTPStatus, body: Any, close: bool = False) -> None:
        data = json.dumps(body, default=str).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": int(status), "headers": headers})
        await send({"type": "http.response.body", "body": data})

    def audit(self, headers: Headers, route: Route, path: str, params: dict[str, str], principal: Principal | None,
              exchange: Exchange, result: Any) -> None:  # fmt: skip
        """One append-only entry: who, the route and its targets, and the outcome."""
        if principal is not None:
            actor = principal.name
        else:
            actor = "unknown-token" if headers.get("authorization") else "anonymous"
        ok = exchange.status == HTTPStatus.OK
        targets: dict[str, Any] = dict(params)
        for source in (exchange.json(exchange.body) if exchange.keep else None, result if ok else None):
            if isinstance(source, dict):
                targets.update({k: source[k] for k in _AUDIT_KEYS if k in source and k not in targets})
        detail: dict[str, Any] = {"path": path, "targets": targets, "status": exchange.status,
                                  "outcome": "ok" if ok else "error"}  # fmt: skip
        if not ok and isinstance(result, dict):
            detail["error"] = result.get("error")
        try:
            self.api.hub.registry.audit(actor, f"{route.method} {route.path}", detail)
        except Exception:
            log.exception("could not write the audit entry for %s %s", route.method, route.path)
