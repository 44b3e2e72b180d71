"""The admin API: JSON over HTTP, owned by the running hub, authenticated with named tokens by role.
`GET /v1/openapi.json` describes every route (OpenAPI 3.1); `POST /v1/enroll` is the one route a
device calls, authenticated by its single-use enrollment token instead.

Errors are JSON ``{"error": message}``: 400 bad input, 401 no, unknown or revoked token, 403 a role
too low or enrollment refused, 404 unknown, 409 conflict (e.g. no artifact fits a device's profile, an
alert resolved twice), 411/413 a body without a length or over the route's limit. ``GET /metrics``
answers Prometheus text instead (any role's token unless ``public_metrics``).

Every route names the lowest role that may call it (``Route.role``, see ``cloud_hub.auth``): 401 for a
missing, unknown or revoked token, 403 naming the role needed. Every route has a body limit checked
before anything is read (411 no Content-Length on a POST, 400 a negative or non-numeric one, 413 over
the route's limit). Every non-GET request, refused or not, is written to the append-only audit log.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from cloud_hub.auth import ACTOR, DEPLOYER, OPERATOR, PUBLIC, VIEWER, Principal, TokenStore, allows
from cloud_hub.errors import Conflict, HubError, NotFound
from cloud_hub.openapi import spec
from cloud_hub.tls_serve import TlsHTTPServer
from device_profiles import ProfileError
from edge_agent.protocol.errors import ArtifactRejected

log = logging.getLogger(__name__)
MAX_UPLOAD_BYTES = 4 * 1024**3
JSON_BODY_BYTES = 1 << 20  # the limit on a JSON request body
ENROLL_BODY_BYTES = 16 * 1024  # /v1/enroll: the one route anyone may call
UPLOAD_BLOCK_BYTES = 1 << 20  # an upload is read and written in blocks of this size
# body and reply fields an audit entry keeps as the change's targets (never a token)
_AUDIT_KEYS = ("model", "version", "target", "a", "b", "split", "strategy", "name", "role", "device_id", "groups",
               "tags", "by", "id", "deployment_id", "artifact_id", "key_id", "retired_key_id")  # fmt: skip
Handler = Callable[[BaseHTTPRequestHandler, dict[str, str], dict[str, list[str]]], Any]


@dataclass(frozen=True)
class Raw:
    """A reply that is not JSON (``/metrics``)."""

    body: bytes
    content_type: str


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    operator: bool = True  # kept for callers; authorisation follows ``role``
    role: str | None = None  # the lowest role allowed (auth.PUBLIC/VIEWER/DEPLOYER/OPERATOR); None: operator only
    max_body: int = 0  # bytes a request body may have (checked from Content-Length before reading)
    path: str = ""  # the path template, e.g. /v1/devices/{id}


class AdminApi:
    """Routes admin requests to the hub; ``hub`` provides the operations (see server.Hub)."""

    def __init__(self, hub: Any, token: str, host: str = "127.0.0.1", port: int = 8080,
                 public_metrics: bool = False, ssl_context: ssl.SSLContext | None = None) -> None:  # fmt: skip
        """``ssl_context``: serve https (cloud_hub/tls_serve.py); None: plain http."""
        self.hub, self.token, self.public_metrics = hub, token, public_metrics
        self._metrics_registry: Any = None
        self._metrics_lock = threading.Lock()
        self.tokens = TokenStore(str(hub.config.state_dir / "registry.db"), token)
        self._local = threading.local()  # this request's caller and JSON body (for the audit log)
        self.routes = self._routes()
        api = self

        class RequestHandler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.handle(self, "GET")

            def do_POST(self) -> None:
                api.handle(self, "POST")

            def do_DELETE(self) -> None:
                api.handle(self, "DELETE")

            def log_message(self, format: str, *args: Any) -> None:
                log.debug(format, *args)

        self.server = (ThreadingHTTPServer((host, port), RequestHandler) if ssl_context is None
                       else TlsHTTPServer((host, port), RequestHandler, ssl_context))  # fmt: skip
        self.scheme = "http" if ssl_context is None else "https"
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="edgefed-admin", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.tokens.close()

    def _routes(self) -> list[Route]:
        hub = self.hub

        def route(method: str, path: str, handler: Handler, operator: bool = True, role: str | None = None,
                  max_body: int | None = None) -> Route:  # fmt: skip
            limit = max_body if max_body is not None else (JSON_BODY_BYTES if method == "POST" else 0)
            pattern = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$")
            return Route(method, pattern, handler, operator, role, limit, path)

        return [
            route("GET", "/v1/openapi.json", lambda r, p, q: spec(), role=PUBLIC),
            route("POST", "/v1/enroll", lambda r, p, q: self._enroll(r), role=PUBLIC, max_body=ENROLL_BODY_BYTES),
            route("GET", "/v1/status", lambda r, p, q: hub.status(), role=VIEWER),
            route("GET", "/v1/models", lambda r, p, q: hub.registry.artifacts(), role=VIEWER),
            route("GET", "/v1/models/{name}", lambda r, p, q: self._model(p["name"]), role=VIEWER),
            route(
                "GET",
                "/v1/models/{name}/{version}",
                lambda r, p, q: hub.model_version(p["name"], p["version"]),
                role=VIEWER,
            ),
            route(
                "POST",
                "/v1/artifacts",
                lambda r, p, q: self._upload(r, q.get("allow_interface_change") == ["1"]),
                role=OPERATOR,
                max_body=int(getattr(hub.config, "max_upload_bytes", MAX_UPLOAD_BYTES)),
            ),
            route("GET", "/v1/devices", lambda r, p, q: hub.registry.devices(), role=VIEWER),
            route("GET", "/v1/devices/{id}", lambda r, p, q: hub.registry.device(p["id"]), role=VIEWER),
            route("DELETE", "/v1/devices/{id}", lambda r, p, q: hub.remove_device(p["id"]), role=OPERATOR),
            route("POST", "/v1/devices/{id}/token", lambda r, p, q: hub.issue_token(p["id"]), role=OPERATOR),
            route("POST", "/v1/enroll-tokens", lambda r, p, q: self._enroll_token(r), role=OPERATOR),
            route("GET", "/v1/deployments", lambda r, p, q: hub.registry.deployments(), role=VIEWER),
            route("GET", "/v1/deployments/{id}", lambda r, p, q: hub.deployment(p["id"]), role=VIEWER),
            route("POST", "/v1/deployments", lambda r, p, q: self._deploy(r), role=DEPLOYER),
            route("POST", "/v1/rollbacks", lambda r, p, q: self._rollback(r), role=DEPLOYER),
            route(
                "GET", "/v1/telemetry", lambda r, p, q: hub.registry.telemetry(q.get("device", [None])[0]), role=VIEWER
            ),
            route(
                "GET",
                "/v1/examples",
                lambda r, p, q: hub.examples.list(q.get("model", [None])[0], q.get("device", [None])[0]),
                role=VIEWER,
            ),
            route(
                "GET",
                "/v1/examples/{id}/npz",
                lambda r, p, q: Raw(hub.examples.read(p["id"]), "application/octet-stream"),
                role=OPERATOR,  # devices' raw inputs: not for viewers
            ),
            route("GET", "/v1/usage", lambda r, p, q: (hub.flush_usage(), hub.registry.usage())[1], role=VIEWER),
            route(
                "GET",
                "/v1/alerts",  # ?state=open|acknowledged|resolved|active|all
                lambda r, p, q: [a.to_dict() for a in hub.alerts.list(q.get("state", [None])[0])],
                role=VIEWER,
            ),
            route("GET", "/v1/alerts/{id}", lambda r, p, q: hub.alerts.get(p["id"]).to_dict(), role=VIEWER),
            route("POST", "/v1/alerts/{id}/ack", lambda r, p, q: self._alert_change(r, p["id"], "ack"), role=OPERATOR),
            route(
                "POST",
                "/v1/alerts/{id}/resolve",
                lambda r, p, q: self._alert_change(r, p["id"], "resolve"),
                role=OPERATOR,
            ),
            route("POST", "/v1/rollouts", lambda r, p, q: hub.rollouts.create(self._json(r, {})), role=DEPLOYER),
            route("GET", "/v1/rollouts", lambda r, p, q: hub.rollouts.list(), role=VIEWER),
            route("GET", "/v1/rollouts/{id}", lambda r, p, q: hub.rollouts.get(p["id"]), role=VIEWER),
            route(
                "POST",
                "/v1/rollouts/{id}/{action}",
                lambda r, p, q: self._rollout_action(p["id"], p["action"]),
                role=DEPLOYER,
            ),
            route("POST", "/v1/ab", lambda r, p, q: self._ab_start(r), role=DEPLOYER),
            route("GET", "/v1/ab", lambda r, p, q: hub.ab.tests(), role=VIEWER),
            route("GET", "/v1/ab/{id}", lambda r, p, q: hub.ab.status(p["id"]), role=VIEWER),
            route("POST", "/v1/ab/{id}/{action}", lambda r, p, q: self._ab_action(p["id"], p["action"]), role=DEPLOYER),
            route("GET", "/v1/drift/{model}", lambda r, p, q: self._drift(p["model"], q), role=VIEWER),
            route("GET", "/metrics", lambda r, p, q: self._metrics(r), role=PUBLIC if self.public_metrics else VIEWER),
            route("GET", "/v1/audit", lambda r, p, q: self.tokens.audit(self._since(q)), role=VIEWER),
            route("GET", "/v1/tokens", lambda r, p, q: self.tokens.list_tokens(), role=OPERATOR),
            route("POST", "/v1/tokens", lambda r, p, q: self._token_create(r), role=OPERATOR),
            route("POST", "/v1/tokens/{name}/revoke", lambda r, p, q: self.tokens.revoke(p["name"]), role=OPERATOR),
            route("GET", "/v1/keys", lambda r, p, q: hub.keys.describe(), role=VIEWER),  # the signed key set
            route(
                "POST",
                "/v1/keys",
                lambda r, p, q: hub.keys.add(self._json(r, {"public_key": str})["public_key"]),
                role=OPERATOR,
            ),
            route("POST", "/v1/keys/{key_id}/revoke", lambda r, p, q: hub.keys.revoke(p["key_id"]), role=OPERATOR),
            route("POST", "/v1/keys/rotate", lambda r, p, q: hub.keys.rotate(), role=OPERATOR),
        ]

    def _token_create(self, request: BaseHTTPRequestHandler) -> dict[str, Any]:
        body = self._json(request, {"name": str, "role": str})
        return self.tokens.create(body["name"], body["role"])

    @staticmethod
    def _since(query: dict[str, list[str]]) -> float:
        try:
            return float(query.get("since", ["0"])[0])
        except ValueError:
            raise ValueError("since: give Unix seconds") from None

    def _rollout_action(self, rollout_id: str, action: str) -> Any:
        actions = {"pause": self.hub.rollouts.pause, "resume": self.hub.rollouts.resume,
                   "abort": self.hub.rollouts.abort, "rollback": self.hub.rollouts.rollback}  # fmt: skip
        if action not in actions:
            raise NotFound(f"no rollout action {action!r}: use {', '.join(actions)}")
        result = actions[action](rollout_id)
        self.hub.registry.audit(ACTOR.get(), f"rollout.{action}", {"rollout": rollout_id})
        return result

    def _ab_start(self, request: BaseHTTPRequestHandler) -> Any:
        body = self._json(request, {"model": str, "a": str, "b": str, "target": str})
        split = body.get("split", 50)
        if isinstance(split, bool) or not isinstance(split, int | float):
            raise ValueError("field 'split' must be a number: the percent of calls for B")
        return self.hub.ab.start(body["model"], body["a"], body["b"], float(split), body["target"])

    def _ab_action(self, test_id: str, action: str) -> Any:
        actions = {"promote": self.hub.ab.promote, "stop": self.hub.ab.stop}
        if action not in actions:
            raise NotFound(f"no A/B action {action!r}: use {', '.join(actions)}")
        return actions[action](test_id)

    def _drift(self, model: str, query: dict[str, list[str]]) -> Any:
        """?version=V (default: the one scored last) &scope=all|group:G &since=UNIX_SECONDS"""
        try:
            since = float(query.get("since", ["0"])[0])
        except ValueError:
            raise ValueError("since: give Unix seconds") from None
        return self.hub.drift_report(model, query.get("version", [None])[0], query.get("scope", ["all"])[0], since)

    def _match(self, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        for candidate in self.routes:
            found = candidate.pattern.match(path)
            if found and candidate.method == method:
                return candidate, found.groupdict()
        return None

    def handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(request.path)
        matched = self._match(method, url.path)
        if matched is None:
            return self._reply(request, HTTPStatus.NOT_FOUND, {"error": f"no route {method} {url.path}"})
        route, params = matched
        self._local.principal, self._local.body = None, None
        status, result = self._dispatch(request, route, params, url.query)
        if isinstance(result, Raw):
            self._reply_raw(request, result)
        else:
            self._reply(request, status, result)
        if method != "GET":
            self._audit(request, route, url.path, params, status, result)

    def _dispatch(self, request: BaseHTTPRequestHandler, route: Route, params: dict[str, str],
                  query: str) -> tuple[HTTPStatus, Any]:  # fmt: skip
        """Authorise, check the body's size, run the handler: (status, reply)."""
        needed = route.role or OPERATOR
        supplied = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        principal = self.tokens.resolve(supplied)
        self._local.principal = principal
        if needed != PUBLIC:
            if principal is None:
                return HTTPStatus.UNAUTHORIZED, {"error": "missing, unknown or revoked admin token: pass --token (or "
                                                 "EDGEFED_HUB_TOKEN) with a token from 'cloud-hub tokens create', or "
                                                 "--state-dir for the hub's operator.token"}  # fmt: skip
            if not allows(principal.role, needed):
                return HTTPStatus.FORBIDDEN, {"error": f"token {principal.name!r} has role {principal.role}; "
                                              f"{route.method} {route.path} needs role {needed} (or higher): ask an "
                                              f"operator for such a token"}  # fmt: skip
        refused = self._check_length(request, route)
        if refused is not None:
            return refused
        acting = ACTOR.set(principal.name if principal else "anonymous")
        try:
            return HTTPStatus.OK, route.handler(request, params, parse_qs(query))
        except NotFound as exc:
            return HTTPStatus.NOT_FOUND, {"error": str(exc)}
        except (Conflict, ArtifactRejected) as exc:
            return HTTPStatus.CONFLICT, {"error": str(exc)}
        except PermissionError as exc:
            return HTTPStatus.FORBIDDEN, {"error": str(exc)}
        except (HubError, ProfileError, ValueError, KeyError) as exc:
            return HTTPStatus.BAD_REQUEST, {"error": str(exc)}
        except Exception:
            log.exception("admin request %s %s failed", route.method, route.path)
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error; see the hub log"}
        finally:
            ACTOR.reset(acting)

    @staticmethod
    def _check_length(request: BaseHTTPRequestHandler, route: Route) -> tuple[HTTPStatus, Any] | None:
        """Refuse a body that is chunked, of no, a negative or a too large declared size (nothing is read)."""
        where = f"{route.method} {route.path}"
        if request.headers.get("Transfer-Encoding"):
            return HTTPStatus.LENGTH_REQUIRED, {"error": f"{where}: chunked bodies are not accepted; send the body "
                                               "with a Content-Length header"}  # fmt: skip
        text = request.headers.get("Content-Length")
        if text is None:
            if route.method == "POST":
                return HTTPStatus.LENGTH_REQUIRED, {"error": f"{where} needs a Content-Length header (0 for an "
                                                   "empty body; with curl: -d '')"}  # fmt: skip
            return None
        if not text.strip().isdigit():
            return HTTPStatus.BAD_REQUEST, {"error": f"Content-Length {text!r} is not a size in bytes (a whole "
                                            "number, 0 or more)"}  # fmt: skip
        if int(text) > route.max_body:
            takes = "takes no body" if route.max_body == 0 else f"takes at most {route.max_body} bytes"
            return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"{where} {takes}; this request declares {int(text)}"}
        return None

    def _audit(self, request: BaseHTTPRequestHandler, route: Route, path: str, params: dict[str, str],
               status: HTTPStatus, result: Any) -> None:  # fmt: skip
        """One append-only entry: who, the route and its targets, and the outcome."""
        principal: Principal | None = self._local.principal
        if principal is not None:
            actor = principal.name
        else:
            actor = "unknown-token" if request.headers.get("Authorization") else "anonymous"
        targets: dict[str, Any] = dict(params)
        for source in (self._local.body, result if status == HTTPStatus.OK else None):
            if isinstance(source, dict):
                targets.update({k: source[k] for k in _AUDIT_KEYS if k in source and k not in targets})
        detail: dict[str, Any] = {"path": path, "targets": targets, "status": int(status),
                                  "outcome": "ok" if status == HTTPStatus.OK else "error"}  # fmt: skip
        if status != HTTPStatus.OK and isinstance(result, dict):
            detail["error"] = result.get("error")
        try:
            self.hub.registry.audit(actor, f"{route.method} {route.path}", detail)
        except Exception:
            log.exception("could not write the audit entry for %s %s", route.method, route.path)

    @staticmethod
    def _body(request: BaseHTTPRequestHandler, limit: int) -> bytes:
        length = int(request.headers.get("Content-Length", "0"))  # checked in _check_length
        if length > limit:
            raise ValueError(f"request body of {length} bytes is over the {limit}-byte limit")
        return request.rfile.read(length)

    def _json(self, request: BaseHTTPRequestHandler, required: dict[str, type]) -> dict[str, Any]:
        try:
            body = json.loads(self._body(request, 1 << 20) or b"{}")
        except ValueError:
            raise ValueError("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        self._local.body = body
        for key, kind in required.items():
            if not isinstance(body.get(key), kind):
                raise ValueError(f"field {key!r} is required ({kind.__name__})")
        return body

    def _upload(self, request: BaseHTTPRequestHandler, allow_interface_change: bool) -> dict[str, Any]:
        """Stream the body to a temporary file in blocks, the size limit checked as it is read (never the
        whole upload in memory); the tar's own checks follow (ArtifactStore.add_tar)."""
        limit = int(getattr(self.hub.config, "max_upload_bytes", MAX_UPLOAD_BYTES))
        header = request.headers.get("Content-Length", "")
        if not header.isdigit():
            raise ValueError("an upload needs a Content-Length (a non-negative number of bytes)")
        length = int(header)
        if length > limit:
            raise ValueError(f"upload of {length} bytes is over the hub's {limit}-byte upload limit")
        with tempfile.NamedTemporaryFile(suffix=".tar", dir=self.hub.config.state_dir) as tmp:
            left = length
            while left > 0:
                block = request.rfile.read(min(left, UPLOAD_BLOCK_BYTES))
                if not block:
                    raise ValueError(f"the upload ended after {length - left} of its {length} bytes")
                tmp.write(block)
                left -= len(block)
            tmp.flush()
            result: dict[str, Any] = self.hub.add_artifact(Path(tmp.name), allow_interface_change)
            return result

    def _deploy(self, request: BaseHTTPRequestHandler) -> dict[str, Any]:
        body = self._json(request, {"model": str, "version": str, "target": str})
        result: dict[str, Any] = self.hub.deploy(body["model"], body["version"], body["target"])
        return result

    def _rollback(self, request: BaseHTTPRequestHandler) -> dict[str, Any]:
        body = self._json(request, {"model": str, "version": str, "target": str})
        result: dict[str, Any] = self.hub.rollback(body["model"], body["version"], body["target"])
        return result

    def _enroll_token(self, request: BaseHTTPRequestHandler) -> dict[str, Any]:
        body = self._json(request, {})
        groups, tags, ttl = body.get("groups", []), body.get("tags", {}), body.get("ttl_s", 3600)
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise ValueError("field 'groups' must be a list of strings")
        if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
            raise ValueError("field 'tags' must be an object of strings")
        if isinstance(ttl, bool) or not isinstance(ttl, int | float):
            raise ValueError("field 'ttl_s' must be a number of seconds")
        reenroll = body.get("reenroll")  # an existing device id this token may re-enroll (docs/security.md)
        if reenroll is not None and not isinstance(reenroll, str):
            raise ValueError("field 'reenroll' must be a device id")
        result: dict[str, Any] = self.hub.enroll_token(groups, tags, float(ttl), reenroll)
        return result

    def _enroll(self, request: BaseHTTPRequestHandler) -> dict[str, Any]:
        body = self._json(request, {"token": str, "device_id": str, "profile": str})
        result: dict[str, Any] = self.hub.enroll(body["token"], body["device_id"], body["profile"])
        return result

    def _alert_change(self, request: BaseHTTPRequestHandler, alert_id: str, action: str) -> dict[str, Any]:
        by = self._json(request, {}).get("by", ACTOR.get())
        if not isinstance(by, str) or not by:
            raise ValueError("field 'by' must be a non-empty string (who acknowledges or resolves)")
        alert = (self.hub.alerts.ack if action == "ack" else self.hub.alerts.resolve)(alert_id, by)
        self.hub.registry.audit(by, f"alerts.{action}", {"alert_id": alert.id, "key": alert.key})
        result: dict[str, Any] = alert.to_dict()
        return result

    def _metrics(self, request: BaseHTTPRequestHandler) -> Raw:
        try:
            from cloud_hub.metrics import HubCollector, exposition, metrics_registry
        except ImportError:
            raise HubError("/metrics needs prometheus-client: pip install 'edgefed[hub]'") from None
        with self._metrics_lock:
            if self._metrics_registry is None:
                hub = self.hub
                collector = HubCollector(str(hub.config.state_dir / "registry.db"), hub.alerts.counts, hub.webhook,
                                         hub.drift_scores, hub.flush_usage)  # fmt: skip
                self._metrics_registry = metrics_registry(collector)
            registry = self._metrics_registry
        body, content_type = exposition(registry, request.headers.get("Accept"))
        return Raw(body, content_type)

    def _model(self, name: str) -> dict[str, Any]:
        artifacts = self.hub.registry.artifacts(name)
        if not artifacts:
            raise NotFound(f"model {name!r} is not registered; see 'cloud-hub models list'")
        return {"name": name, "versions": sorted({a["version"] for a in artifacts}), "artifacts": artifacts}

    @staticmethod
    def _reply_raw(request: BaseHTTPRequestHandler, raw: Raw) -> None:
        request.send_response(HTTPStatus.OK)
        request.send_header("Content-Type", raw.content_type)
        request.send_header("Content-Length", str(len(raw.body)))
        request.end_headers()
        request.wfile.write(raw.body)

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, status: HTTPStatus, body: Any) -> None:
        data = json.dumps(body, default=str).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)
