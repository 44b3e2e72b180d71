"""The admin API: JSON over HTTP, owned by the running hub, authenticated with named tokens by role.

A FastAPI app (cloud_hub/api/: the routers by area, the gate every request passes, the server) served by
uvicorn in a thread of ``cloud-hub serve``. ``GET /v1/openapi.json`` is its OpenAPI document, generated
from the routes and their pydantic models; ``POST /v1/enroll`` is the one route a device calls,
authenticated by its single-use enrollment token instead; ``GET /`` and ``/static/...`` serve the
dashboard's files; ``GET /v1/events`` streams live changes (Server-Sent Events).

Errors are JSON ``{"error": message}``: 400 bad input (naming the field), 401 no, unknown or revoked
token, 403 a role too low or enrollment refused, 404 unknown, 409 conflict (e.g. no artifact fits a
device's profile, an alert resolved twice), 411/413 a body without a length or over the route's limit.
``GET /metrics`` answers Prometheus text instead (any role's token unless ``public_metrics``).

Every route names the lowest role that may call it (``routes[i].role``, see ``cloud_hub.auth``): 401 for
a missing, unknown or revoked token, 403 naming the role needed. Every route has a body limit checked
before anything is read (411 no Content-Length on a POST, 400 a negative or non-numeric one, 413 over
the route's limit). Every non-GET request, refused or not, is written to the append-only audit log.
"""

from __future__ import annotations

import ssl
from typing import Any

from cloud_hub.api.app import create_app
from cloud_hub.api.events import Events
from cloud_hub.api.routing import ENROLL_BODY_BYTES, JSON_BODY_BYTES, Route, routes_of
from cloud_hub.api.serve import BackgroundServer
from cloud_hub.auth import TokenStore

MAX_UPLOAD_BYTES = 4 * 1024**3
__all__ = ["ENROLL_BODY_BYTES", "JSON_BODY_BYTES", "MAX_UPLOAD_BYTES", "AdminApi", "Route"]


class AdminApi:
    """The admin API of one hub; ``hub`` provides the operations (see server.Hub)."""

    def __init__(self, hub: Any, token: str, host: str = "127.0.0.1", port: int = 8080,
                 public_metrics: bool = False, ssl_context: ssl.SSLContext | None = None) -> None:  # fmt: skip
        """``ssl_context``: serve https (cloud_hub/tls_serve.py); None: plain http. ``port`` 0: any free
        port (``self.port`` is the one bound)."""
        self.hub, self.token, self.public_metrics = hub, token, public_metrics
        self.upload_limit = int(getattr(hub.config, "max_upload_bytes", MAX_UPLOAD_BYTES))
        self.tokens = TokenStore(hub.registry.sql_db(), token, hub.registry.audit_log)
        self.events = Events(hub)
        self.app = create_app(self)
        self.scheme = "http" if ssl_context is None else "https"
        self._server = BackgroundServer(self.app, host, port, ssl_context)
        self.port = self._server.port

    @property
    def routes(self) -> list[Route]:
        """Every route the app serves, one per method, with its role and body limit."""
        return routes_of(self.app)

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self.events.closing.set()  # live event streams end first: the server then has nothing to wait for
        self._server.stop()
        self.tokens.close()
