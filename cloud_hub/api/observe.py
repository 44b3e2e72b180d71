"""How the fleet is doing: the hub's status, alerts, drift reports and Prometheus metrics."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from cloud_hub.api import bodies
from cloud_hub.api.routing import route
from cloud_hub.auth import ACTOR, OPERATOR, PUBLIC, VIEWER
from cloud_hub.errors import HubError

if TYPE_CHECKING:
    from cloud_hub.admin import AdminApi

ALERT_STATES = ["open", "acknowledged", "resolved", "active", "all"]
_TEXT = {200: {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}}
AlertState = Annotated[str | None, Query(json_schema_extra={"enum": ALERT_STATES})]  # the store names a bad one


class Metrics:
    """The Prometheus registry of ``/metrics``, made on the first scrape."""

    def __init__(self, api: AdminApi) -> None:
        self.api, self._lock = api, threading.Lock()
        self._registry: Any = None

    def scrape(self, accept: str | None) -> Response:
        try:
            from cloud_hub.metrics import HubCollector, exposition, metrics_registry
        except ImportError:
            raise HubError("/metrics needs prometheus-client: pip install 'edgefed[hub]'") from None
        with self._lock:
            if self._registry is None:
                hub = self.api.hub
                collector = HubCollector(hub.registry.sql_db(), hub.alerts.counts, hub.webhook,
                                         hub.drift_scores, hub.flush_usage)  # fmt: skip
                self._registry = metrics_registry(collector)
            registry = self._registry
        body, content_type = exposition(registry, accept)
        return Response(body, media_type=content_type)


def add(routes: APIRouter, api: AdminApi) -> None:
    """Add this area's routes to ``routes`` (the app's router)."""
    hub, metrics = api.hub, Metrics(api)

    @route(routes, "GET", "/v1/status", VIEWER, summary="Endpoints and counters")
    def status() -> Any:
        return hub.status()

    @route(routes, "GET", "/v1/alerts", VIEWER, summary="Alerts, most recently seen first")
    def alerts(state: AlertState = None) -> Any:
        return [a.to_dict() for a in hub.alerts.list(state)]

    @route(routes, "GET", "/v1/alerts/{id}", VIEWER, summary="One alert")
    def alert(id: str) -> Any:
        return hub.alerts.get(id).to_dict()

    def change(alert_id: str, action: str, body: bodies.AlertChange | None) -> Any:
        by = (body.by if body is not None else None) or ACTOR.get()
        if body is not None and body.by == "":
            raise ValueError("field 'by' must be a non-empty string (who acknowledges or resolves)")
        alert = (hub.alerts.ack if action == "ack" else hub.alerts.resolve)(alert_id, by)
        hub.registry.audit(by, f"alerts.{action}", {"alert_id": alert.id, "key": alert.key})
        return alert.to_dict()

    @route(routes, "POST", "/v1/alerts/{id}/ack", OPERATOR,
           summary="Acknowledge an open alert (409 when it is not open)")  # fmt: skip
    def ack(id: str, body: bodies.AlertChange | None = None) -> Any:
        return change(id, "ack", body)

    @route(routes, "POST", "/v1/alerts/{id}/resolve", OPERATOR,
           summary="Resolve an alert (409 when already resolved)")  # fmt: skip
    def resolve(id: str, body: bodies.AlertChange | None = None) -> Any:
        return change(id, "resolve", body)

    @route(routes, "GET", "/v1/drift/{model}", VIEWER,
           summary="A model version's drift report: features by score with reference and live counts, and the "
                   "windows' scores (version: default the one scored last; scope: all or group:G)")  # fmt: skip
    def drift(model: str, version: str | None = None, scope: str = "all", since: float = 0.0) -> Any:
        return hub.drift_report(model, version, scope, since)

    @route(routes, "GET", "/metrics", PUBLIC if api.public_metrics else VIEWER, responses=_TEXT,
           summary="Prometheus metrics (text exposition); public when the hub runs with --public-metrics")  # fmt: skip
    def scrape(request: Request) -> Response:
        return metrics.scrape(request.headers.get("accept"))
