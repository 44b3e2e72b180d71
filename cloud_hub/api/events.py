"""``GET /v1/events``: live updates as Server-Sent Events, for the dashboard.

While at least one client listens, the hub reads its registry about once a second and sends what changed
since the last read (a new client gets what changes from then on; it reads the current state from the
other routes first):

``event: device``      ``{"device_id", "status", "last_seen", "active": {model: version}}``
``event: deployment``  ``{"deployment_id", "name", "version", "counts": {"active": n, "pending": n, ...}}``
                       (the newest ``DEPLOYMENTS`` deployments; counts of ``GET /v1/deployments/{id}`` states)
``event: rollout``     ``{"id", "state", "current_wave"}``

and a ``: keepalive`` comment every ``KEEPALIVE_S``. Each client has a queue of ``QUEUE`` events; a client
that falls that far behind is sent ``event: overflow`` and its stream ends (it reconnects and reads the
state again). Every stream ends when the hub stops. The token goes in the Authorization header, as on every
route (the dashboard reads the stream with fetch(), never EventSource, so no token is ever in a URL).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from cloud_hub.api.routing import route
from cloud_hub.auth import VIEWER
from cloud_hub.errors import NotFound

if TYPE_CHECKING:
    from cloud_hub.admin import AdminApi

log = logging.getLogger(__name__)
POLL_S, KEEPALIVE_S, QUEUE, DEPLOYMENTS = 1.0, 15.0, 256, 10
Event = tuple[str, dict[str, Any]]
_STREAM = {200: {"description": "text/event-stream: device, deployment and rollout events",
                 "content": {"text/event-stream": {"schema": {"type": "string"}}}}}  # fmt: skip


def snapshot(hub: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """What the events report, keyed by (event, id)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for device in hub.registry.devices():
        models = (device.get("reported") or {}).get("models", [])
        active = {m["name"]: m.get("version") for m in models if m.get("state") == "active"}
        found["device", device["device_id"]] = {"device_id": device["device_id"], "status": device.get("status"),
                                                "last_seen": device.get("last_seen"), "active": active}  # fmt: skip
    for row in hub.registry.deployments()[:DEPLOYMENTS]:
        try:
            states = hub.deployment(row["deployment_id"])["states"]
        except NotFound:
            continue
        counts = Counter(s.get("state", "unknown") for s in states.values())
        found["deployment", row["deployment_id"]] = {"deployment_id": row["deployment_id"], "name": row["name"],
                                                     "version": row["version"], "counts": dict(counts)}  # fmt: skip
    for rollout in hub.rollouts.list():
        found["rollout", rollout["id"]] = {"id": rollout["id"], "state": rollout["state"],
                                           "current_wave": rollout["current_wave"]}  # fmt: skip
    return found


class Events:
    """The poller and its listeners, on the admin server's event loop."""

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self.closing = threading.Event()  # set by AdminApi.stop: every stream ends
        self._queues: set[asyncio.Queue[Event | None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._last: dict[tuple[str, str], dict[str, Any]] = {}

    async def stream(self) -> AsyncIterator[str]:
        queue: asyncio.Queue[Event | None] = asyncio.Queue(QUEUE)
        self._queues.add(queue)
        if self._task is None or self._task.done():
            self._last = await run_in_threadpool(snapshot, self.hub)
            self._task = asyncio.create_task(self._poll())
        try:
            yield ": connected\n\n"
            quiet = 0.0  # seconds since the last thing sent
            while not self.closing.is_set():  # looked at every POLL_S at least
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=POLL_S)
                except TimeoutError:
                    quiet += POLL_S
                    if quiet >= KEEPALIVE_S:
                        quiet = 0.0
                        yield ": keepalive\n\n"
                    continue
                quiet = 0.0
                if event is None:  # this client fell behind
                    yield "event: overflow\ndata: {}\n\n"
                    return
                yield f"event: {event[0]}\ndata: {json.dumps(event[1], default=str)}\n\n"
        finally:
            self._queues.discard(queue)

    async def _poll(self) -> None:
        while self._queues and not self.closing.is_set():
            await asyncio.sleep(POLL_S)
            try:
                now = await run_in_threadpool(snapshot, self.hub)
            except Exception:
                log.exception("live events: reading the registry failed")
                continue
            changed = [(kind, value) for (kind, key), value in now.items() if self._last.get((kind, key)) != value]
            self._last = now
            for queue in list(self._queues):
                for event in changed:
                    if queue.qsize() >= QUEUE - 1:
                        queue.put_nowait(None)
                        self._queues.discard(queue)
                        break
                    queue.put_nowait(event)


def add(routes: APIRouter, api: AdminApi) -> None:
    """Add this area's routes to ``routes`` (the app's router)."""

    @route(routes, "GET", "/v1/events", VIEWER, responses=_STREAM,
           summary="Live updates (Server-Sent Events): device, deployment and rollout changes, a keepalive "
                   "comment every 15 s")  # fmt: skip
    async def events() -> StreamingResponse:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(api.events.stream(), media_type="text/event-stream", headers=headers)
