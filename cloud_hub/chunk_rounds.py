"""Artifact chunks served on request, in rounds: requests are coalesced per artifact, so one publish of a
chunk reaches every device fetching it at that moment (the broker does the fan-out). A part of the
control plane (``ControlPlane`` inherits it); with hub replicas only the leader runs the rounds."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from cloud_hub.artifacts import Artifacts
from cloud_hub.errors import NotFound
from cloud_hub.fetch_limits import FetchLimiter
from cloud_hub.registry import Registry
from edge_agent.mqtt import MqttConnection
from edge_agent.protocol.errors import ArtifactRejected
from edge_agent.protocol.manifest import Manifest, manifest_from_wire
from edge_agent.protocol.messages import Chunk, FetchRequest, from_wire
from edge_agent.protocol.topics import Topics

log = logging.getLogger(__name__)


class ChunkRounds:
    # what the control plane provides
    mqtt: MqttConnection
    registry: Registry
    store: Artifacts
    topics: Topics
    leading: Callable[[], bool]
    _stop: threading.Event

    def _device(self, topic: str) -> str:
        parsed = self.topics.parse_device_topic(topic)
        if parsed is None:
            raise ValueError(f"not a device topic: {topic}")
        return parsed[0]

    def init_chunk_rounds(self, max_chunk_rate: float, fetch_window_s: float, shared_above: float) -> None:
        self._pending: dict[str, dict[tuple[int, int], set[str]]] = {}  # artifact → chunk → devices
        self._pending_whole: dict[str, set[str]] = {}  # artifact → devices that asked for all of it
        self._sending: dict[str, set[tuple[int, int]]] = {}  # this round's chunks not yet published
        self._pending_lock = threading.Condition()
        self._sender = threading.Thread(target=self._send_chunks, name="edgefed-chunks", daemon=True)
        self.chunks_sent = 0
        self.unicast_chunks_sent = 0
        self.corrupt_chunks = 0  # chunks not sent because the hub's copy fails its sha256
        # a chunk that a device fetching the whole artifact wants, or more than this share of a round's
        # devices, goes on the shared topic; another (a re-ask after loss) to each of its askers on their
        # own topics (0: always shared; 1: per device unless a whole-artifact fetch wants it)
        self.shared_above = shared_above
        self.bytes_sent = 0
        self.chunk_interval_s = 1.0 / max_chunk_rate if max_chunk_rate > 0 else 0.0  # a cap for thin uplinks
        self.fetch_window_s = fetch_window_s
        self.fetch_limiter = FetchLimiter()  # per-device chunk request limits (the hub sets its own)

    def _on_fetch(self, topic: str, payload: bytes) -> None:
        if not self.leading():  # another replica runs the chunk rounds; the device asks again if it changes
            return
        device_id = self._device(topic)
        request = from_wire(FetchRequest, payload)
        manifest = manifest_from_wire(self.registry.artifact(request.artifact_id)["manifest"])
        wanted = {(c[0], c[1]) for c in request.chunks if len(c) == 2} or {
            (f, c) for f, entry in enumerate(manifest.files) for c in range(len(entry.chunks))
        }
        valid = {(f, c) for f, c in wanted if 0 <= f < len(manifest.files) and 0 <= c < len(manifest.files[f].chunks)}
        total = sum(len(entry.chunks) for entry in manifest.files)
        admitted = self.fetch_limiter.admit(device_id, request.artifact_id, valid, total)
        if len(admitted) < len(valid):
            log.info("device %s: %d of %d chunks of %s over its fetch limit, not sent", device_id,
                     len(valid) - len(admitted), len(valid), request.artifact_id[:12])  # fmt: skip
            if not admitted:
                return
            request, valid = FetchRequest(request.artifact_id, tuple(sorted(admitted))), admitted
        with self._pending_lock:
            # the device subscribed to the chunk topic before it asked, so what this round has yet to
            # publish reaches it anyway: only the rest waits for the next round
            coming = valid & self._sending.get(request.artifact_id, set())
            if valid - coming:
                askers = self._pending.setdefault(request.artifact_id, {})
                for chunk in valid - coming:
                    askers.setdefault(chunk, set()).add(device_id)
                if not request.chunks:
                    self._pending_whole.setdefault(request.artifact_id, set()).add(device_id)
                self._pending_lock.notify()
        log.info("device %s fetches %d chunks of %s (%d already on their way)", device_id, len(valid),
                 request.artifact_id[:12], len(coming))  # fmt: skip

    def _send_chunks(self) -> None:
        """Rounds: wait for a request, let ``fetch_window_s`` gather the others (a fleet asks at about the
        same time), then publish what was asked, each chunk once on the artifact's topic; a chunk that
        only a few of the round's devices ask for again (independent loss) goes to each of them on its
        own topic instead, so the others are not sent it again. A request that arrives during a round
        is served by what the round has still to publish on the shared topic; the rest forms the next."""
        while not self._stop.is_set():
            with self._pending_lock:
                while not self._pending and not self._stop.is_set():
                    self._pending_lock.wait(timeout=1)
            self._stop.wait(self.fetch_window_s)
            with self._pending_lock:
                work, whole, self._pending, self._pending_whole = self._pending, self._pending_whole, {}, {}
                plans = {aid: self._split(wanted, whole.get(aid, set())) for aid, wanted in work.items()}
                self._sending = {artifact_id: set(shared) for artifact_id, (shared, _) in plans.items()}
            for artifact_id, (shared, own) in plans.items():
                try:
                    self._publish_chunks(artifact_id, shared, own)
                except Exception:  # this thread must outlive any one round
                    log.exception("chunk round for %s failed", artifact_id[:12])
                with self._pending_lock:
                    self._sending.pop(artifact_id, None)

    def _split(
        self, wanted: dict[tuple[int, int], set[str]], whole: set[str]
    ) -> tuple[list[tuple[int, int]], dict[str, list[tuple[int, int]]]]:
        """(chunks for the shared topic, chunks per device for their own topics)."""
        devices = len(set().union(*wanted.values()))
        shared: list[tuple[int, int]] = []
        own: dict[str, list[tuple[int, int]]] = {}
        for chunk, askers in sorted(wanted.items()):
            if askers & whole or len(askers) > self.shared_above * devices:
                shared.append(chunk)
            else:
                for device_id in askers:
                    own.setdefault(device_id, []).append(chunk)
        return shared, own

    def _publish_chunks(self, artifact_id: str, shared: list[tuple[int, int]],
                        own: dict[str, list[tuple[int, int]]]) -> None:  # fmt: skip
        try:
            manifest = manifest_from_wire(self.registry.artifact(artifact_id)["manifest"])
        except (NotFound, ArtifactRejected) as exc:
            log.warning("cannot serve chunks of %s: %s", artifact_id, exc)
            return
        topic = self.topics.chunks(artifact_id)
        for chunk in shared:
            with self._pending_lock:  # from here on, a request for this chunk needs another round
                self._sending[artifact_id].discard(chunk)
            if not self._publish_chunk(topic, manifest, chunk):
                return
        for device_id, chunks in own.items():
            for chunk in chunks:
                if not self._publish_chunk(self.topics.device_chunks(device_id, artifact_id), manifest, chunk):
                    return
                self.unicast_chunks_sent += 1

    def _publish_chunk(self, topic: str, manifest: Manifest, chunk: tuple[int, int]) -> bool:
        """Publish one chunk (at most ``max_chunk_rate`` a second); False when the round must end (the hub
        is stopping, the broker is gone)."""
        if self._stop.is_set():
            return False
        try:
            data = self.store.read_chunk(manifest, *chunk)
        except (ArtifactRejected, OSError) as exc:  # never publish what devices would refuse; say so loudly
            self.corrupt_chunks += 1
            log.error("artifact %s is unreadable in the hub's store (%s): add it again", manifest.artifact_id[:12], exc)
            return True
        try:
            self.mqtt.publish(topic, Chunk(*chunk, data).to_wire(), qos=1).wait_for_publish(timeout=30)
        except RuntimeError as exc:  # the broker is gone: end the round; agents ask again once reconnected
            log.warning("chunk round for %s stopped: %s", manifest.artifact_id[:12], exc)
            return False
        if self.chunk_interval_s:
            self._stop.wait(self.chunk_interval_s)
        self.chunks_sent += 1
        self.bytes_sent += len(data)
        return True
