"""Who calls: the OpenAPI document, the caller's own token, named tokens, the audit log and the signed key set."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request

from cloud_hub.api import bodies
from cloud_hub.api.gate import PRINCIPAL
from cloud_hub.api.routing import route
from cloud_hub.auth import OPERATOR, PUBLIC, VIEWER

if TYPE_CHECKING:
    from cloud_hub.admin import AdminApi


def add(routes: APIRouter, api: AdminApi) -> None:
    """Add this area's routes to ``routes`` (the app's router)."""

    @route(routes, "GET", "/v1/openapi.json", PUBLIC, summary="This description (OpenAPI 3.1)")
    def openapi(request: Request) -> Any:
        return request.app.openapi()

    @route(routes, "GET", "/v1/whoami", VIEWER, summary="The caller's token: its name and role")
    def whoami(request: Request) -> Any:
        principal = getattr(request.state, PRINCIPAL)
        return {"name": principal.name, "role": principal.role}

    @route(routes, "GET", "/v1/tokens", OPERATOR,
           summary="Named admin tokens: name, role, created, last used, revoked (never the token)")  # fmt: skip
    def tokens() -> Any:
        return api.tokens.list_tokens()

    @route(routes, "POST", "/v1/tokens", OPERATOR,
           summary="Create a named token; the reply holds the token, shown this once")  # fmt: skip
    def token_create(body: bodies.TokenCreate) -> Any:
        return api.tokens.create(body.name, body.role)

    @route(routes, "POST", "/v1/tokens/{name}/revoke", OPERATOR,
           summary="Revoke a named token: it answers 401 from now on")  # fmt: skip
    def token_revoke(name: str) -> Any:
        return api.tokens.revoke(name)

    @route(routes, "GET", "/v1/audit", VIEWER,
           summary="The append-only audit log, oldest first: every change made through the API (refused ones "
                   "too) with actor, route, targets and outcome")  # fmt: skip
    def audit(since: float = 0.0) -> Any:
        return api.tokens.audit(since)

    @route(routes, "GET", "/v1/keys", VIEWER,
           summary="The signed key set in force: version, hub keys, trusted and revoked artifact-signing keys, "
                   "and the signed document (keyset)")  # fmt: skip
    def keys() -> Any:
        return api.hub.keys.describe()

    @route(routes, "POST", "/v1/keys", OPERATOR,
           summary="Trust one more artifact-signing key (a new key set version)")  # fmt: skip
    def key_add(body: bodies.PublicKey) -> Any:
        return api.hub.keys.add(body.public_key)

    @route(routes, "POST", "/v1/keys/{key_id}/revoke", OPERATOR,
           summary="Revoke an artifact-signing key for good: devices and uploads refuse what it signed")  # fmt: skip
    def key_revoke(key_id: str) -> Any:
        return api.hub.keys.revoke(key_id)

    @route(routes, "POST", "/v1/keys/rotate", OPERATOR,
           summary="Replace the hub key: a key set signed by the old and the new key; the old key retired")  # fmt: skip
    def key_rotate() -> Any:
        return api.hub.keys.rotate()
