"""The admin API: JSON over HTTP, owned by the running hub, authenticated with the operator token.
`GET /v1/openapi.json` describes every route (OpenAPI 3.1); `POST /v1/enroll` is the one route a
device calls, authenticated by its single-use enrollment token instead.

Errors are JSON ``{"error": message}``: 400 bad input, 401 no/wrong operator token, 403 enrollment
refused, 404 unknown, 409 conflict (e.g. no artifact fits a device's profile, an alert resolved twice).
``GET /metrics`` answers Prometheus text instead (operator token unless ``public_metrics``).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from cloud_hub.errors import Conflict, HubError, NotFound
from cloud_hub.openapi import spec
from device_profiles import ProfileError
from edge_agent.protocol.errors import ArtifactRejected

log = logging.getLogger(__name__)
MAX_UPLOAD_BYTES = 4 * 1024**3
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
    operator: bool = True  # needs the operator token


class AdminApi:
    """Routes admin requests to the hub; ``hub`` provides the operations (see server.Hub)."""

    def __init__(self, hub: Any, token: str, host: str = "127.0.0.1", port: int = 8080,
                 public_metrics: bool = False) -> None:  # fmt: skip
        self.hub, self.token, self.public_metrics = hub, token, public_metrics
        self._metrics_registry: Any = None
        self._metrics_lock = threading.Lock()
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

        self.server = ThreadingHTTPServer((host, port), RequestHandler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="edgefed-admin", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _routes(self) -> list[Route]:
        hub = self.hub

        def route(method: str, path: str, handler: Handler, operator: bool = True) -> Route:
            return Route(
                method, re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$"), handler, operator
            )

        return [
            route("GET", "/v1/openapi.json", lambda r, p, q: spec(), operator=False),
            route("POST", "/v1/enroll", lambda r, p, q: self._enroll(r), operator=False),
            route("GET", "/v1/status", lambda r, p, q: hub.status()),
            route("GET", "/v1/models", lambda r, p, q: hub.registry.artifacts()),
            route("GET", "/v1/models/{name}", lambda r, p, q: self._model(p["name"])),
            route("GET", "/v1/models/{name}/{version}", lambda r, p, q: hub.model_version(p["name"], p["version"])),
            route("POST", "/v1/artifacts", lambda r, p, q: self._upload(r, q.get("allow_interface_change") == ["1"])),
            route("GET", "/v1/devices", lambda r, p, q: hub.registry.devices()),
            route("GET", "/v1/devices/{id}", lambda r, p, q: hub.registry.device(p["id"])),
            route("DELETE", "/v1/devices/{id}", lambda r, p, q: hub.remove_device(p["id"])),
            route("POST", "/v1/devices/{id}/token", lambda r, p, q: hub.issue_token(p["id"])),
            route("POST", "/v1/enroll-tokens", lambda r, p, q: self._enroll_token(r)),
            route("GET", "/v1/deployments", lambda r, p, q: hub.registry.deployments()),
            route("GET", "/v1/deployments/{id}", lambda r, p, q: hub.deployment(p["id"])),
            route("POST", "/v1/deployments", lambda r, p, q: self._deploy(r)),
            route("POST", "/v1/rollbacks", lambda r, p, q: self._rollback(r)),
            route("GET", "/v1/telemetry", lambda r, p, q: hub.registry.telemetry(q.get("device", [None])[0])),
            route(
                "GET",
                "/v1/examples",
                lambda r, p, q: hub.examples.list(q.get("model", [None])[0], q.get("device", [None])[0]),
            ),
            route(
                "GET",
                "/v1/examples/{id}/npz",
                lambda r, p, q: Raw(hub.examples.read(p["id"]), "application/octet-stream"),
            ),
            route("GET", "/v1/usage", lambda r, p, q: (hub.flush_usage(), hub.registry.usage())[1]),
            route(
                "GET",
                "/v1/alerts",  # ?state=open|acknowledged|resolved|active|all
                lambda r, p, q: [a.to_dict() for a in hub.alerts.list(q.get("state", [None])[0])],
            ),
            route("GET", "/v1/alerts/{id}", lambda r, p, q: hub.alerts.get(p["id"]).to_dict()),
            route("POST", "/v1/alerts/{id}/ack", lambda r, p, q: self._alert_change(r, p["id"], "ack")),
            route("POST", "/v1/alerts/{id}/resolve", lambda r, p, q: self._alert_change(r, p["id"], "resolve")),
            route("POST", "/v1/rollouts", lambda r, p, q: hub.rollouts.create(self._json(r, {}))),
            route("GET", "/v1/rollouts", lambda r, p, q: hub.rollouts.list()),
            route("GET", "/v1/rollouts/{id}", lambda r, p, q: hub.rollouts.get(p["id"])),
            route("POST", "/v1/rollouts/{id}/{action}", lambda r, p, q: self._rollout_action(p["id"], p["action"])),
            route("POST", "/v1/ab", lambda r, p, q: self._ab_start(r)),
            route("GET", "/v1/ab", lambda r, p, q: hub.ab.tests()),
            route("GET", "/v1/ab/{id}", lambda r, p, q: hub.ab.status(p["id"])),
            route("POST", "/v1/ab/{id}/{action}", lambda r, p, q: self._ab_action(p["id"], p["action"])),
            route("GET", "/v1/drift/{model}", lambda r, p, q: self._drift(p["model"], q)),
            route("GET", "/metrics", lambda r, p, q: self._metrics(r), operator=not self.public_metrics),
        ]

    def _rollout_action(self, rollout_id: str, action: str) -> Any:
        actions = {"pause": self.hub.rollouts.pause, "resume": self.hub.rollouts.resume,
                   "abort": self.hub.rollouts.abort, "rollback": self.hub.rollouts.rollback}  # fmt: skip
        if action not in actions:
            raise NotFound(f"no rollout action {action!r}: use {', '.join(actions)}")
        result = actions[action](rollout_id)
        self.hub.registry.audit("operator", f"rollout.{action}", {"rollout": rollout_id})
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
        supplied = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if route.operator and not hmac.compare_digest(supplied.encode(), self.token.encode()):
            return self._reply(request, HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong operator token"})
        try:
            result = route.handler(request, params, parse_qs(url.query))
            if isinstance(result, Raw):
                return self._reply_raw(request, result)
            self._reply(request, HTTPStatus.OK, result)
        except NotFound as exc:
            self._reply(request, HTTPStatus.NOT_FOUND, {"error": str(exc)})
        except (Conflict, ArtifactRejected) as exc:
            self._reply(request, HTTPStatus.CONFLICT, {"error": str(exc)})
        except PermissionError as exc:
            self._reply(request, HTTPStatus.FORBIDDEN, {"error": str(exc)})
        except (HubError, ProfileError, ValueError, KeyError) as exc:
            self._reply(request, HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        except Exception:
            log.exception("admin request %s %s failed", method, url.path)
            self._reply(request, HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error; see the hub log"})

    @staticmethod
    def _body(request: BaseHTTPRequestHandler, limit: int) -> bytes:
        length = int(request.headers.get("Content-Length", "0"))
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
        for key, kind in required.items():
            if not isinstance(body.get(key), kind):
                raise ValueError(f"field {key!r} is required ({kind.__name__})")
        return body

    def _upload(self, request: BaseHTTPRequestHandler, allow_interface_change: bool) -> dict[str, Any]:
        with tempfile.NamedTemporaryFile(suffix=".tar") as tmp:
            tmp.write(self._body(request, MAX_UPLOAD_BYTES))
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
        result: dict[str, Any] = self.hub.enroll_token(groups, tags, float(ttl))
        return result

    def _enroll(self, request: BaseHTTPRequestHandler) -> dict[str, Any]:
        body = self._json(request, {"token": str, "device_id": str, "profile": str})
        result: dict[str, Any] = self.hub.enroll(body["token"], body["device_id"], body["profile"])
        return result

    def _alert_change(self, request: BaseHTTPRequestHandler, alert_id: str, action: str) -> dict[str, Any]:
        by = self._json(request, {}).get("by", "operator")
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
