"""The admin API: JSON over HTTP, owned by the running hub and authenticated with the operator token.

    GET  /v1/status                      hub, broker and inference endpoints, counters
    GET  /v1/models                      registered artifacts
    POST /v1/artifacts                   body: tar of an artifact directory → registers it
    GET  /v1/devices                     known devices with status and reported state
    GET  /v1/deployments                 deployments, newest first
    POST /v1/deployments                 {"model", "version", "target": "device:ID"}
    GET  /v1/telemetry[?device=ID]       stored telemetry batches
    POST /v1/devices/{id}/token          issue a bearer token for the device's cloud calls (shown once)
    GET  /v1/usage                       cloud calls per device and model

Errors are JSON ``{"error": message}`` with 400 (bad input), 401, 404 (unknown), 409 (conflict).
"""

from __future__ import annotations

import hmac
import json
import logging
import tempfile
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from cloud_hub.errors import Conflict, HubError, NotFound
from edge_agent.protocol.errors import ArtifactRejected

log = logging.getLogger(__name__)
MAX_UPLOAD_BYTES = 4 * 1024**3


class AdminApi:
    """Routes admin requests to the hub; ``hub`` provides the operations (see server.Hub)."""

    def __init__(self, hub: Any, token: str, host: str = "127.0.0.1", port: int = 8080) -> None:
        self.hub, self.token = hub, token
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.handle(self, "GET")

            def do_POST(self) -> None:
                api.handle(self, "POST")

            def log_message(self, format: str, *args: Any) -> None:
                log.debug(format, *args)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="edgefed-admin", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _routes(self) -> dict[tuple[str, str], Callable[[BaseHTTPRequestHandler, dict[str, list[str]]], Any]]:
        hub = self.hub
        return {
            ("GET", "/v1/status"): lambda r, q: hub.status(),
            ("GET", "/v1/models"): lambda r, q: hub.registry.artifacts(),
            ("POST", "/v1/artifacts"): lambda r, q: self._upload(r),
            ("GET", "/v1/devices"): lambda r, q: hub.registry.devices(),
            ("GET", "/v1/deployments"): lambda r, q: hub.registry.deployments(),
            ("POST", "/v1/deployments"): lambda r, q: self._deploy(r),
            ("GET", "/v1/telemetry"): lambda r, q: hub.registry.telemetry(q.get("device", [None])[0]),
            ("GET", "/v1/usage"): lambda r, q: (hub.flush_usage(), hub.registry.usage())[1],
        }

    def handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(request.path)
        supplied = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(supplied.encode(), self.token.encode()):
            return self._reply(request, HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong operator token"})
        route = self._routes().get((method, url.path))
        parts = url.path.strip("/").split("/")
        if (
            route is None
            and method == "POST"
            and len(parts) == 4
            and parts[:2] == ["v1", "devices"]
            and parts[3] == "token"
        ):
            route = lambda r, q: self.hub.issue_token(parts[2])  # noqa: E731
        if route is None:
            return self._reply(request, HTTPStatus.NOT_FOUND, {"error": f"no route {method} {url.path}"})
        try:
            self._reply(request, HTTPStatus.OK, route(request, parse_qs(url.query)))
        except NotFound as exc:
            self._reply(request, HTTPStatus.NOT_FOUND, {"error": str(exc)})
        except (Conflict, ArtifactRejected) as exc:
            self._reply(request, HTTPStatus.CONFLICT, {"error": str(exc)})
        except (HubError, ValueError, KeyError) as exc:
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

    def _upload(self, request: BaseHTTPRequestHandler) -> dict[str, Any]:
        with tempfile.NamedTemporaryFile(suffix=".tar") as tmp:
            tmp.write(self._body(request, MAX_UPLOAD_BYTES))
            tmp.flush()
            result: dict[str, Any] = self.hub.add_artifact(Path(tmp.name))
            return result

    def _deploy(self, request: BaseHTTPRequestHandler) -> dict[str, Any]:
        body = json.loads(self._body(request, 1 << 20) or b"{}")
        missing = [k for k in ("model", "version", "target") if not isinstance(body.get(k), str)]
        if missing:
            raise ValueError(f"field {missing[0]!r} is required (a string)")
        result: dict[str, Any] = self.hub.deploy(body["model"], body["version"], body["target"])
        return result

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, status: HTTPStatus, body: Any) -> None:
        data = json.dumps(body, default=str).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)
