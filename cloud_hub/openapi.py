"""The admin API's OpenAPI 3.1 description (served at ``GET /v1/openapi.json``)."""

from __future__ import annotations

from typing import Any

from edge_agent import __version__

_OBJECT = {"type": "object"}
_LIST = {"type": "array", "items": _OBJECT}


def _op(summary: str, response: dict[str, Any], body: dict[str, Any] | None = None, public: bool = False,
        content_type: str = "application/json") -> dict[str, Any]:  # fmt: skip
    op: dict[str, Any] = {"summary": summary, "responses": {
        "200": {"description": "OK", "content": {"application/json": {"schema": response}}},
        "400": {"description": "Bad input"}, "401": {"description": "Missing or wrong operator token"},
        "404": {"description": "Unknown"}, "409": {"description": "Conflict"},
        "403": {"description": "The token's role may not call this route (the message names the role needed)"},
    }}  # fmt: skip
    if body is not None:
        op["responses"].update({"411": {"description": "No Content-Length (chunked bodies are refused)"},
                                "413": {"description": "Body over this route's size limit"}})  # fmt: skip
    if body is not None:
        op["requestBody"] = {"required": True, "content": {content_type: {"schema": body}}}
    if public:
        op["security"] = []
    return op


def _props(required: list[str], **props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props}


_STR, _NUM = {"type": "string"}, {"type": "number"}
_PATH_ID = [{"name": "id", "in": "path", "required": True, "schema": _STR}]


def spec() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "edgefed hub admin API", "version": __version__},
        "components": {"securitySchemes": {"operator": {"type": "http", "scheme": "bearer"}}},
        "security": [{"operator": []}],
        "paths": {
            "/v1/openapi.json": {"get": _op("This description", _OBJECT, public=True)},
            "/v1/status": {"get": _op("Endpoints and counters", _OBJECT)},
            "/v1/models": {"get": _op("Registered artifacts, newest release first", _LIST)},
            "/v1/models/{name}": {"get": {**_op("One model's versions and artifacts", _OBJECT),
                                          "parameters": [{"name": "name", "in": "path", "required": True,
                                                          "schema": _STR}]}},
            "/v1/models/{name}/{version}": {"get": {**_op("One version: release, interface and artifact per profile",
                                                          _OBJECT), "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": _STR},
                {"name": "version", "in": "path", "required": True, "schema": _STR}]}},
            "/v1/artifacts": {"post": _op("Upload a signed artifact directory as a tar", _OBJECT,
                                          {"type": "string", "format": "binary"}, content_type="application/x-tar")},
            "/v1/devices": {"get": _op("Known devices", _LIST)},
            "/v1/devices/{id}": {"get": {**_op("One device", _OBJECT), "parameters": _PATH_ID},
                                 "delete": {**_op("Forget a device", _OBJECT), "parameters": _PATH_ID}},
            "/v1/devices/{id}/token": {"post": {**_op("Issue a cloud bearer token for the device", _OBJECT),
                                                "parameters": _PATH_ID}},
            "/v1/enroll-tokens": {"post": _op("A single-use, expiring enrollment token", _OBJECT, _props(
                [], groups={"type": "array", "items": _STR}, tags={"type": "object", "additionalProperties": _STR},
                ttl_s=_NUM))},
            "/v1/enroll": {"post": _op("Enroll a device with its enrollment token", _OBJECT,
                                       _props(["token", "device_id", "profile"], token=_STR, device_id=_STR,
                                              profile=_STR), public=True)},
            "/v1/deployments": {
                "get": _op("Deployments, newest first", _LIST),
                "post": _op("Deploy a model version", _OBJECT, _props(
                    ["model", "version", "target"], model=_STR, version=_STR,
                    target={"type": "string", "pattern": "^(device|group|tag):.+$"})),
            },
            "/v1/rollbacks": {"post": _op(
                "Roll a target back to a model version: a deployment whose hub-signed desired states let devices "
                "go below their installed release (docs/security.md)", _OBJECT, _props(
                    ["model", "version", "target"], model=_STR, version=_STR,
                    target={"type": "string", "pattern": "^(device|group|tag):.+$"}))},
            "/v1/ab": {
                "get": _op("A/B tests, newest first (docs/ab.md)", _LIST),
                "post": _op("Start an A/B test: B beside A on the target's devices, split percent of calls to B "
                            "(409 when A and B differ in interface, naming the difference)", _OBJECT, _props(
                                ["model", "a", "b", "split", "target"], model=_STR, a=_STR, b=_STR,
                                split={"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 100},
                                target={"type": "string", "pattern": "^(device|group|tag):.+$"})),
            },
            "/v1/ab/{id}": {"get": {**_op("One A/B test with per-version figures, 95% intervals, B - A "
                                          "differences, the observed split and a verdict", _OBJECT),
                                    "parameters": _PATH_ID}},
            "/v1/ab/{id}/{action}": {"post": {**_op("promote (B everywhere the test ran) or stop (A alone) an A/B "
                                                    "test (409 when it is not running)", _OBJECT), "parameters": [
                *_PATH_ID, {"name": "action", "in": "path", "required": True, "schema": {
                    "type": "string", "enum": ["promote", "stop"]}}]}},
            "/v1/deployments/{id}": {"get": {**_op("A deployment and each device's state", _OBJECT),
                                             "parameters": _PATH_ID}},
            "/v1/telemetry": {"get": {**_op("Stored telemetry batches", _LIST), "parameters": [
                {"name": "device", "in": "query", "required": False, "schema": _STR}]}},
            "/v1/examples": {"get": {**_op("Hard examples devices uploaded (opt-in), newest first; no arrays",
                                           _LIST), "parameters": [
                {"name": "model", "in": "query", "required": False, "schema": _STR},
                {"name": "device", "in": "query", "required": False, "schema": _STR}]}},
            "/v1/examples/{id}/npz": {"get": {"summary": "One hard example's arrays (.npz: input/NAME, output/NAME)",
                                              "parameters": _PATH_ID, "responses": {
                "200": {"description": "OK", "content": {"application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"}}}},
                "401": {"description": "Missing or wrong operator token"}, "404": {"description": "Unknown"}}}},
            "/v1/usage": {"get": _op("Cloud inference calls per device and model", _LIST)},
            "/v1/alerts": {"get": {**_op("Alerts, most recently seen first", _LIST), "parameters": [
                {"name": "state", "in": "query", "required": False, "schema": {
                    "type": "string", "enum": ["open", "acknowledged", "resolved", "active", "all"]}}]}},
            "/v1/alerts/{id}": {"get": {**_op("One alert", _OBJECT), "parameters": _PATH_ID}},
            "/v1/alerts/{id}/ack": {"post": {**_op("Acknowledge an open alert (409 when it is not open)", _OBJECT,
                                                   _props([], by=_STR)), "parameters": _PATH_ID}},
            "/v1/alerts/{id}/resolve": {"post": {**_op("Resolve an alert (409 when already resolved)", _OBJECT,
                                                       _props([], by=_STR)), "parameters": _PATH_ID}},
            "/v1/rollouts": {
                "get": _op("Rollouts, newest first", _LIST),
                "post": _op("Start a rollout: waves with health gates (docs/rollouts.md)", _OBJECT, _props(
                    ["model", "version", "target"], model=_STR, version=_STR, target=_STR,
                    strategy={"type": "string", "enum": ["all", "canary", "waves"]}, canary=_STR,
                    waves={"type": "array", "items": _STR}, pause_s={"type": "number"}, gates={"type": "object"},
                    abort={"type": "object"}, on_failure={"type": "string", "enum": ["rollback", "halt"]},
                    wave_timeout_s={"type": "number"})),
            },
            "/v1/rollouts/{id}": {"get": {**_op("One rollout: waves, gate verdicts, events", _OBJECT),
                                          "parameters": _PATH_ID}},
            "/v1/rollouts/{id}/{action}": {"post": {**_op("pause, resume, abort or rollback a rollout (409 when "
                                                          "its state does not allow it)", _OBJECT), "parameters": [
                *_PATH_ID, {"name": "action", "in": "path", "required": True, "schema": {
                    "type": "string", "enum": ["pause", "resume", "abort", "rollback"]}}]}},
            "/v1/audit": {"get": {**_op("The append-only audit log, oldest first: every change made through the "
                                        "API (refused ones too) with actor, route, targets and outcome", _LIST),
                                  "parameters": [{"name": "since", "in": "query", "required": False,
                                                  "schema": {"type": "number"}}]}},
            "/v1/tokens": {
                "get": _op("Named admin tokens: name, role, created, last used, revoked (never the token)", _LIST),
                "post": _op("Create a named token; the reply holds the token, shown this once (operator)", _OBJECT,
                            _props(["name", "role"], name=_STR,
                                   role={"type": "string", "enum": ["operator", "deployer", "viewer"]})),
            },
            "/v1/tokens/{name}/revoke": {"post": {**_op("Revoke a named token: it answers 401 from now on "
                                                        "(operator)", _OBJECT), "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": _STR}]}},
            "/v1/keys": {
                "get": _op("The signed key set in force: version, hub keys, trusted and revoked artifact-signing "
                           "keys, and the signed document (keyset)", _OBJECT),
                "post": _op("Trust one more artifact-signing key (a new key set version) (operator)", _OBJECT,
                            _props(["public_key"], public_key=_STR)),
            },
            "/v1/keys/{key_id}/revoke": {"post": {**_op("Revoke an artifact-signing key for good: devices and "
                                                        "uploads refuse what it signed (operator)", _OBJECT),
                                                  "parameters": [{"name": "key_id", "in": "path", "required": True,
                                                                  "schema": _STR}]}},
            "/v1/keys/rotate": {"post": _op("Replace the hub key: a key set signed by the old and the new key; "
                                            "the old key retired (operator)", _OBJECT)},
            "/v1/drift/{model}": {"get": {**_op("A model version's drift report: features by score with reference "
                                                "and live counts, and the windows' scores", _OBJECT), "parameters": [
                {"name": "model", "in": "path", "required": True, "schema": _STR},
                {"name": "version", "in": "query", "required": False, "schema": _STR},
                {"name": "scope", "in": "query", "required": False, "schema": _STR},
                {"name": "since", "in": "query", "required": False, "schema": {"type": "number"}}]}},
            "/metrics": {"get": {"summary": "Prometheus metrics (text exposition format); public when the hub runs "
                                            "with --public-metrics",
                                 "responses": {"200": {"description": "OK", "content": {"text/plain": {
                                     "schema": {"type": "string"}}}},
                                     "401": {"description": "Missing or wrong operator token"}}}},
        },
    }  # fmt: skip
