"""Models: registered artifacts, versions, the artifact upload, and the hard examples devices sent."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from cloud_hub.api.routing import UPLOAD, route
from cloud_hub.auth import DEPLOYER, OPERATOR, VIEWER
from cloud_hub.errors import NotFound
from edge_agent.protocol.manifest import manifest_from_wire

if TYPE_CHECKING:
    from cloud_hub.admin import AdminApi

UPLOAD_BLOCK_BYTES = 1 << 20  # an upload is written to disk in blocks of this size
_TAR = {"requestBody": {"required": True, "content": {"application/x-tar": {
    "schema": {"type": "string", "format": "binary"}}}}}  # fmt: skip
_BINARY = {200: {"description": "OK", "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}  # fmt: skip
_NPZ = _BINARY


async def upload(api: AdminApi, request: Request, allow_interface_change: bool) -> Any:
    """Stream the body to a temporary file in blocks (never the whole upload in memory; its size was checked
    against the limit from Content-Length, which the server holds the body to); the tar's own checks
    follow (ArtifactStore.add_tar)."""
    length = int(request.headers.get("content-length", "0"))
    with tempfile.NamedTemporaryFile(suffix=".tar", dir=api.hub.config.state_dir) as tmp:
        block, received = bytearray(), 0
        try:
            async for chunk in request.stream():
                block += chunk
                received += len(chunk)
                if len(block) >= UPLOAD_BLOCK_BYTES:
                    await run_in_threadpool(tmp.write, bytes(block))
                    block.clear()
        except ClientDisconnect:
            raise ValueError(f"the upload ended after {received} of its {length} bytes") from None
        if received != length:
            raise ValueError(f"the upload ended after {received} of its {length} bytes")
        await run_in_threadpool(tmp.write, bytes(block))
        await run_in_threadpool(tmp.flush)
        return await run_in_threadpool(api.hub.add_artifact, Path(tmp.name), allow_interface_change)


def add(routes: APIRouter, api: AdminApi) -> None:
    """Add this area's routes to ``routes`` (the app's router)."""
    hub = api.hub

    @route(routes, "GET", "/v1/models", VIEWER, summary="Registered artifacts, newest release first")
    def models() -> Any:
        return hub.registry.artifacts()

    @route(routes, "GET", "/v1/models/{name}", VIEWER, summary="One model's versions and artifacts")
    def model(name: str) -> Any:
        artifacts = hub.registry.artifacts(name)
        if not artifacts:
            raise NotFound(f"model {name!r} is not registered; see 'cloud-hub models list'")
        return {"name": name, "versions": sorted({a["version"] for a in artifacts}), "artifacts": artifacts}

    @route(routes, "GET", "/v1/models/{name}/{version}", VIEWER,
           summary="One version: release, interface and artifact per profile")  # fmt: skip
    def model_version(name: str, version: str) -> Any:
        return hub.model_version(name, version)

    @route(routes, "GET", "/v1/models/{name}/{version}/served", VIEWER,
           summary="The artifact this hub's inference server runs for a version (cloud-hub export-triton)")  # fmt: skip
    def served(name: str, version: str) -> Any:
        manifest = hub.repository.pick(name, version)
        return {"artifact_id": manifest_from_wire(manifest).artifact_id, "serving_profile": hub.serving_profile.id,
                "manifest": manifest}  # fmt: skip

    @route(routes, "GET", "/v1/artifacts/{artifact_id}/files/{path}", DEPLOYER, responses=_BINARY,
           summary="One file of a registered artifact as stored: a model's weights, so deployers and operators "
                   "only (callers check it against the manifest)")  # fmt: skip
    def artifact_file(artifact_id: str, path: str) -> Response:
        manifest = manifest_from_wire(hub.registry.artifact(artifact_id)["manifest"])
        if path not in [f.path for f in manifest.files]:
            raise NotFound(f"artifact {artifact_id} has no file {path!r}")
        stored = hub.store.path(artifact_id) / path  # (S3: downloaded and checked into the cache first)
        if not stored.is_file():
            raise NotFound(f"{path} of artifact {artifact_id} is missing from the hub's store; add it again")
        return FileResponse(stored, media_type="application/octet-stream")

    @route(routes, "POST", "/v1/artifacts", OPERATOR, max_body=UPLOAD, openapi_extra=_TAR,
           summary="Upload a signed artifact directory as a tar (streamed to disk; size-limited)")  # fmt: skip
    async def artifacts(request: Request, allow_interface_change: str | None = None) -> Any:
        return await upload(api, request, allow_interface_change == "1")

    @route(routes, "GET", "/v1/examples", VIEWER,
           summary="Hard examples devices uploaded (opt-in), newest first; no arrays")  # fmt: skip
    def examples(model: str | None = None, device: str | None = None) -> Any:
        return hub.examples.list(model, device)

    @route(routes, "GET", "/v1/examples/{id}/npz", OPERATOR, responses=_NPZ,  # devices' raw inputs: not for viewers
           summary="One hard example's arrays (.npz: input/NAME, output/NAME)")  # fmt: skip
    def example_arrays(id: str) -> Response:
        return Response(hub.examples.read(id), media_type="application/octet-stream")
