"""Devices: enrollment, the registry's devices, their cloud tokens, telemetry and cloud usage."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter

from cloud_hub.api import bodies
from cloud_hub.api.routing import ENROLL_BODY_BYTES, route
from cloud_hub.auth import OPERATOR, PUBLIC, VIEWER

if TYPE_CHECKING:
    from cloud_hub.admin import AdminApi


def add(routes: APIRouter, api: AdminApi) -> None:
    """Add this area's routes to ``routes`` (the app's router)."""
    hub = api.hub

    @route(routes, "POST", "/v1/enroll", PUBLIC, max_body=ENROLL_BODY_BYTES,
           summary="Enroll a device with its single-use enrollment token (no admin token)")  # fmt: skip
    def enroll(body: bodies.Enroll) -> Any:
        return hub.enroll(body.token, body.device_id, body.profile)

    @route(routes, "POST", "/v1/enroll-tokens", OPERATOR, summary="A single-use, expiring enrollment token")
    def enroll_token(body: bodies.EnrollToken | None = None) -> Any:
        body = body or bodies.EnrollToken()
        return hub.enroll_token(body.groups, body.tags, body.ttl_s, body.reenroll)

    @route(routes, "GET", "/v1/devices", VIEWER, summary="Known devices")
    def devices() -> Any:
        return hub.registry.devices()

    @route(routes, "GET", "/v1/devices/{id}", VIEWER, summary="One device")
    def device(id: str) -> Any:
        return hub.registry.device(id)

    @route(routes, "DELETE", "/v1/devices/{id}", OPERATOR, summary="Forget a device")
    def remove(id: str) -> Any:
        return hub.remove_device(id)

    @route(routes, "POST", "/v1/devices/{id}/token", OPERATOR, summary="Issue a cloud bearer token for the device")
    def device_token(id: str) -> Any:
        return hub.issue_token(id)

    @route(routes, "GET", "/v1/telemetry", VIEWER, summary="Stored telemetry batches")
    def telemetry(device: str | None = None) -> Any:
        return hub.registry.telemetry(device)

    @route(routes, "GET", "/v1/usage", VIEWER, summary="Cloud inference calls per device and model")
    def usage() -> Any:
        hub.flush_usage()
        return hub.registry.usage()
