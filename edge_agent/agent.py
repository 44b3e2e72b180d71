"""`edge-agent run`: the daemon that keeps a device's models in the desired state and ships telemetry.

MQTT callbacks only enqueue work; one agent thread verifies, installs and reports, so a slow install
never stalls the network loop and a malformed message never stops the daemon. Every install step is
journaled (``InstallJournal``) and every step is idempotent, so an agent killed anywhere converges on
restart: to the new version active, or a reported failure with the previous version serving.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from device_profiles import DeviceProfile, get_profile
from edge_agent import __version__
from edge_agent.ab_agent import AbFollower
from edge_agent.active_watch import ActiveWatch
from edge_agent.config import AgentConfig
from edge_agent.desired_guard import DesiredGuard, models_to_follow, record_override
from edge_agent.example_upload import ExampleUploader
from edge_agent.journal import JOURNAL_DIR, InstallJournal
from edge_agent.mqtt import MqttConnection
from edge_agent.protocol.artifact import check_freshness
from edge_agent.protocol.atomic import atomic_write_bytes
from edge_agent.protocol.errors import ArtifactRejected, MessageError
from edge_agent.protocol.manifest import Manifest, manifest_from_wire, now_text
from edge_agent.protocol.messages import (
    Chunk,
    DesiredModel,
    DesiredRequest,
    FetchRequest,
    ReportedModel,
    ReportedState,
    Status,
    TelemetryAck,
    desired_digest,
    from_wire,
    reported_to_wire,
    short_error,
    to_wire,
)
from edge_agent.protocol.signing import TrustStore, verify_document
from edge_agent.protocol.topics import Topics
from edge_agent.runtimes import open_runtime, zero_inputs
from edge_agent.store import ModelStore, check_compatible, kill_point
from edge_agent.telemetry import SPOOL_FILE, Spool
from edge_agent.transfer import Transfer

log = logging.getLogger(__name__)
STALL_S = 3.0
ASK_DESIRED_AFTER_S = 2.0  # after a connection, ask for the desired state if none arrived by then
AGENT_STATUS_FILE = "agent-status.json"


def health_check(directory: Path, manifest: Manifest, profile: DeviceProfile) -> None:
    """Load the runtime, warm it with one zero input shaped like the signature (dynamic axes = 1), then
    check the artifact's golden samples (``edge_agent.golden``; raises GoldenSamplesFailed, an
    ArtifactRejected); an artifact without golden samples passes on finite zero-input outputs."""
    from edge_agent.golden import check_golden  # here: health_check is the golden check's only caller

    runtime = open_runtime(directory, manifest, profile)
    outputs = runtime.run(zero_inputs(manifest.inputs))
    if not all(np.all(np.isfinite(v)) for v in outputs.values() if v.dtype.kind == "f"):
        raise RuntimeError("health check produced non-finite outputs")
    check_golden(directory, manifest, runtime)


class Agent:
    def __init__(self, state_dir: Path, config: AgentConfig) -> None:
        self.state_dir, self.config = state_dir, config
        self.profile = get_profile(config.profile)
        self.store = ModelStore(state_dir / "models")
        self.trust = TrustStore.from_dir(state_dir / "trust")
        self.spool = Spool(state_dir / SPOOL_FILE)
        self.topics = Topics(config.topic_root)
        self.device_id = config.device_id
        offline = to_wire(Status("offline", now_text()))
        self.mqtt = MqttConnection(
            config.broker,
            client_id=f"edgefed-{config.device_id}",
            clean_session=False,
            will=(self.topics.status(config.device_id), offline),
            on_connect=self._on_connect,
            on_state=self._broker_state,
        )
        self.mqtt.route(self.topics.desired(self.device_id), self._enqueue(self._on_desired))
        self.mqtt.route(self.topics.telemetry_ack(self.device_id), self._enqueue(self._on_ack))
        self.examples = ExampleUploader(state_dir, self.mqtt, self.topics, self.device_id)  # opt-in hard examples
        self.mqtt.route(self.topics.examples_ack(self.device_id), self._enqueue(self.examples.on_ack))
        self.mqtt.route(self.topics.device_chunks(self.device_id), self._enqueue(self._on_chunk))
        self.events: queue.Queue[Callable[[], None]] = queue.Queue(maxsize=1024)
        self.transfers: dict[str, tuple[DesiredModel, Transfer, float]] = {}
        self.reported: dict[str, ReportedModel] = {}
        self.desired_error: str | None = None  # why the last desired state was refused
        self.applied_desired = ""  # desired_digest of the last desired state followed
        self.ask_desired_at = math.inf
        self.next_telemetry = 0.0  # when the next telemetry batch may go
        self.stop_event = threading.Event()
        self.installs = 0
        self.journal = InstallJournal(state_dir / JOURNAL_DIR)
        self.guard = DesiredGuard(state_dir, self.device_id)  # hub signature and counter (docs/security.md)
        self.watch = ActiveWatch(self.store)  # active versions switched by other processes
        self.watch_at = 0.0
        self.ab = AbFollower(self)  # the B sides of A/B tests (docs/ab.md)

    def _enqueue(self, handler: Callable[[str, bytes], None]) -> Callable[[str, bytes], None]:
        return lambda topic, payload: self.events.put(lambda: handler(topic, payload))

    def _broker_state(self, connected: bool, error: str | None) -> None:
        """What `edge-agent status` shows about the broker link (``AGENT_STATUS_FILE``, written atomically)."""
        state = {"broker": self.config.broker, "connected": connected, "error": error, "since": now_text(),
                 "pid": os.getpid()}  # fmt: skip
        try:  # called from paho's network thread: a full disk must not stop it
            atomic_write_bytes(self.state_dir / AGENT_STATUS_FILE, json.dumps(state).encode())
        except OSError as exc:
            log.warning("cannot write %s: %s", AGENT_STATUS_FILE, exc)

    def _on_connect(self) -> None:
        self.mqtt.publish(self.topics.status(self.device_id), to_wire(Status("online", now_text())), retain=True)
        self.events.put(self._publish_reported)
        self.events.put(functools.partial(self.examples.reset, time.monotonic()))  # unacknowledged: again
        self.ask_desired_at = time.monotonic() + ASK_DESIRED_AFTER_S  # the retained copy comes first
        for artifact_id in list(self.transfers):
            self.events.put(functools.partial(self._request_missing, artifact_id))

    # desired state -------------------------------------------------------------------------------
    def _ask_for_desired(self) -> None:
        """The retained desired state may be gone (a broker that lost it): ask the hub, which answers
        when the registry's differs from ``applied_desired``."""
        self.ask_desired_at = math.inf
        request = DesiredRequest(self.applied_desired)
        self.mqtt.publish(self.topics.desired_get(self.device_id), to_wire(request))

    def _on_desired(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        self._note_local_switches()  # not yet seen, it would not stand against the same decision delivered again
        try:
            accepted = self.guard.accept(payload)  # unsigned, forged, replayed: refused, nothing changed
        except MessageError as exc:  # say so: the hub shows the deployment failed, not pending
            log.error("refused the desired state: %s", exc)
            text = str(exc) if str(exc).startswith("desired state refused") else f"desired state refused: {exc}"
            self.desired_error = short_error(text)
            self._publish_reported()
            return
        desired = accepted.state
        self.desired_error = None
        self.applied_desired = desired_digest(m.artifact_id for m in desired.models)
        follow, overridden = models_to_follow(accepted, self.state_dir, self.store.active)
        self.reported.update(overridden)
        for model in follow:
            self._converge(model)
        self.ab.follow(desired.models, accepted.signed)
        self._clean_downloads()
        self._publish_reported()

    def _clean_downloads(self) -> None:
        """Remove finished or abandoned downloads: anything not being fetched for the desired state."""
        downloads = self.state_dir / "downloads"
        for path in downloads.iterdir() if downloads.is_dir() else []:
            if path.name not in self.transfers:
                shutil.rmtree(path, ignore_errors=True)

    def _converge(self, model: DesiredModel) -> None:
        active = self.store.active(model.name)
        if active is not None and active.artifact_id == model.artifact_id:
            self.reported[model.name] = ReportedModel(model.name, "active", active.version, active.artifact_id)
            self.journal.discard(model.name)  # whatever was in flight for it, this is now settled
            return
        if model.artifact_id in self.transfers or self._activate_installed(
            model.name, model.version, model.artifact_id, model.rollback
        ):
            return
        try:
            manifest = self._check_offer(model)
        except ArtifactRejected as exc:
            log.warning("refused %s@%s: %s", model.name, model.version, exc)
            self._report_failed(model.name, model.version, model.artifact_id, str(exc))
            return
        transfer = Transfer(self.state_dir / "downloads", manifest, model.manifest, model.signature)
        self.transfers[model.artifact_id] = (model, transfer, time.monotonic())
        self.reported[model.name] = ReportedModel(model.name, "downloading", model.version, model.artifact_id)
        self.journal.record(model.name, model.version, model.artifact_id, "fetching")
        self.mqtt.route(self.topics.chunks(model.artifact_id), self._enqueue(self._on_chunk))
        log.info(
            "fetching %s@%s: %d of %d chunks missing",
            model.name,
            model.version,
            len(transfer.missing),
            len(transfer.wanted),
        )
        if transfer.complete:
            self._finish(model.artifact_id)
        else:
            self._request_missing(model.artifact_id)

    def _activate_installed(self, name: str, version: str, artifact_id: str, rollback: bool = False) -> bool:
        """The desired artifact is already installed above the active release (an install killed before
        its activation), or at any release for a signed ``rollback``: verify it, health-check it and
        activate it, with no fetch and no refusal of the agent's own install as a downgrade. False when it
        is not (fetch and check as usual)."""
        check = self._checker(name, version, artifact_id)
        try:
            if not self.store.activate_installed(artifact_id, name, check, allow_release_below=rollback):
                return False
        except Exception as exc:
            log.warning("activating installed %s@%s failed: %s", name, version, exc)
            self._outcome(name, version, artifact_id, str(exc))
            return True
        finally:
            self._own_switch(name, artifact_id)
        log.info("activated installed %s@%s", name, version)
        self._outcome(name, version, artifact_id)
        return True

    def _checker(self, name: str, version: str, artifact_id: str) -> Callable[[Path, Manifest], None]:
        """The health check, journaled: ``installed`` before it runs, ``checked`` once it passed."""

        def check(directory: Path, manifest: Manifest) -> None:
            self.journal.record(name, version, artifact_id, "installed")
            health_check(directory, manifest, self.profile)
            self.journal.record(name, version, artifact_id, "checked")

        return check

    def _outcome(self, name: str, version: str, artifact_id: str, error: str | None = None) -> None:
        """Journal and report how an install ended: active, or failed with ``error``."""
        self.journal.record(name, version, artifact_id, "activated" if error is None else "failed", error)
        if error is None:
            self.reported[name] = ReportedModel(name, "active", version, artifact_id)
        else:
            self._report_failed(name, version, artifact_id, error)

    def _report_failed(self, name: str, version: str, artifact_id: str, error: str) -> None:
        self.reported[name] = ReportedModel(name, "failed", version, artifact_id, short_error(error))

    def resume(self) -> None:
        """Finish what a crash interrupted, before any message arrives (the broker may be down): an
        install that reached the store is verified, checked and activated; outcomes are re-reported."""
        for entry in self.journal.entries():
            name, version, artifact_id = entry["name"], entry["version"], entry["artifact_id"]
            active = self.store.active(name)
            if active is not None and active.artifact_id == artifact_id:
                self.reported[name] = ReportedModel(name, "active", version, artifact_id)
            elif entry["step"] == "failed":
                self._report_failed(name, version, artifact_id, entry.get("error") or "failed")
            elif entry["step"] == "activated":  # switched away since (a rollback): nothing left to finish
                self.journal.discard(name)
            elif not self._activate_installed(name, version, artifact_id):
                log.info("resuming %s@%s from %s when the desired state arrives", name, version, entry["step"])

    def _check_offer(self, model: DesiredModel) -> Manifest:
        """Everything that can be checked before a single chunk is fetched."""
        verify_document(model.manifest, model.signature, self.trust)
        manifest = manifest_from_wire(model.manifest)
        if manifest.artifact_id != model.artifact_id:
            raise ArtifactRejected("manifest", "artifact id does not match the manifest")
        check_compatible(manifest, self.profile)
        installed = max((m.release for m in self.store.versions(manifest.name)), default=None)
        check_freshness(manifest, None if model.rollback else installed)  # rollback: signed by the hub (guard)
        if manifest.total_size > self.profile.max_artifact_bytes:
            raise ArtifactRejected("too-large", f"{manifest.total_size} bytes is over {self.profile.id}'s limit")
        return manifest

    def _request_missing(self, artifact_id: str) -> None:
        if artifact_id not in self.transfers:
            return
        model, transfer, _ = self.transfers[artifact_id]
        missing = transfer.missing
        chunks = () if len(missing) == len(transfer.wanted) else tuple(missing)
        self.mqtt.publish(self.topics.fetch(self.device_id), to_wire(FetchRequest(artifact_id, chunks)))
        self.transfers[artifact_id] = (model, transfer, time.monotonic())

    # chunks and install ----------------------------------------------------------------------------
    def _on_chunk(self, topic: str, payload: bytes) -> None:
        artifact_id = self.topics.chunk_artifact(topic)
        if artifact_id not in self.transfers:
            return
        model, transfer, _ = self.transfers[artifact_id]
        chunk = Chunk.from_wire(payload)
        try:
            transfer.add(chunk.file_index, chunk.chunk_index, chunk.data)
        except ArtifactRejected as exc:
            log.warning("bad chunk for %s: %s (will fetch again)", artifact_id[:12], exc)
            return
        self.transfers[artifact_id] = (model, transfer, time.monotonic())
        if transfer.complete:
            self._finish(artifact_id)

    def _finish(self, artifact_id: str) -> None:
        model, transfer, _ = self.transfers.pop(artifact_id)
        self.mqtt.unroute(self.topics.chunks(artifact_id))
        if artifact_id in self.ab.fetching:  # the B side of an A/B test: installed beside A, never activated
            self.ab.finish(artifact_id, transfer, allow_release_below=model.rollback)
            self._publish_reported()
            transfer.discard()
            return
        try:
            self.journal.record(model.name, model.version, artifact_id, "downloaded")
            kill_point("downloaded")
            source = transfer.assemble()
            kill_point("assembled")
            check = self._checker(model.name, model.version, artifact_id)
            try:
                manifest = self.store.install(source, self.trust, self.profile, activate=True, check=check,
                                              allow_release_below=model.rollback)  # fmt: skip
            finally:
                self._own_switch(model.name, artifact_id)
            self.installs += 1
            log.info("activated %s@%s", manifest.name, manifest.version)
            self._outcome(model.name, model.version, artifact_id)
        except Exception as exc:
            log.warning("install of %s@%s failed: %s", model.name, model.version, exc)
            self._outcome(model.name, model.version, artifact_id, str(exc))
        self._publish_reported()
        kill_point("reported")
        transfer.discard()

    def _publish_reported(self) -> None:
        self._note_local_switches()  # a local switch since the last look is reported as one, never absorbed
        for name in self.store.names():
            active = self.store.active(name)
            if active and name not in self.reported:
                self.reported[name] = ReportedModel(name, "active", active.version, active.artifact_id)
        state = ReportedState(self.device_id, self.profile.id, __version__, now_text(),
                              tuple(map(self.ab.attach, self.reported.values())), self.desired_error,
                              self.guard.counter)  # fmt: skip
        self.mqtt.publish(self.topics.reported(self.device_id), reported_to_wire(state), retain=True)
        self.journal.remove_final()

    def _watch_active(self) -> None:
        """Report at once an active version switched by another process (a local `edge-agent rollback`):
        it stands as a device-side override until the hub's next desired state (docs/security.md)."""
        if self._note_local_switches():
            self._publish_reported()

    def _own_switch(self, name: str, artifact_id: str) -> None:
        """Right after the daemon switched (or tried to switch) ``name`` to ``artifact_id`` under the store's
        writer lock: a pointer now at it is the daemon's own switch, not a local one."""
        try:
            record = self.store.active(name)
        except (OSError, ValueError, TypeError):
            return
        if record is not None and record.artifact_id == artifact_id:
            self.watch.mark_seen(name)

    def _note_local_switches(self) -> bool:
        """Record the active versions switched by another process since the last look (the daemon marks
        its own switches seen as it makes them); whether there were any."""
        changed = self.watch.changed()
        for name, record in changed.items():
            log.info("%s: %s made active on the device (a local switch); reporting it", name, record.version)
            self.reported[name] = ReportedModel(name, "active", record.version, record.artifact_id, origin="local")
            record_override(self.state_dir, name, record.version, record.artifact_id)
        return bool(changed)

    # telemetry ----------------------------------------------------------------------------------
    def _on_ack(self, topic: str, payload: bytes) -> None:
        ack = from_wire(TelemetryAck, payload)
        self.spool.acknowledge(ack.seq, ack.epoch or None)  # an ack for another spool's batch is ignored

    def send_telemetry(self) -> None:
        batch = self.spool.next_batch(self.device_id)
        if batch is not None and self.mqtt.connected:
            self.mqtt.publish(self.topics.telemetry(self.device_id), to_wire(batch))

    # main loop ----------------------------------------------------------------------------------
    def _periodic(self, now: float) -> None:
        """Re-asks for stalled chunks, the desired state, active-pointer changes, telemetry, examples."""
        for artifact_id, (_, _, last) in list(self.transfers.items()):
            if now - last > STALL_S:
                self._request_missing(artifact_id)
        if now >= self.ask_desired_at:
            self._ask_for_desired()
        if now >= self.watch_at:
            self.watch_at = now + 1.0
            self._watch_active()
        if now >= self.next_telemetry:
            self.next_telemetry = now + self.config.telemetry_interval_s
            self.send_telemetry()
        self.examples.send(now)

    def run(self) -> None:
        self.resume()  # its own switches are marked seen as it makes them
        self._broker_state(False, "connecting")
        self.mqtt.start_in_background()
        self.next_telemetry = time.monotonic()
        try:
            while not self.stop_event.is_set():
                try:
                    self.events.get(timeout=0.2)()
                except queue.Empty:
                    pass
                except Exception:
                    log.exception("agent event failed")
                try:
                    self._periodic(time.monotonic())
                except Exception:  # a spool or broker error must not stop the daemon: the next tick tries again
                    log.exception("agent periodic work failed")
        finally:
            offline = to_wire(Status("offline", now_text()))
            if self.mqtt.connected:
                self.mqtt.publish(self.topics.status(self.device_id), offline, retain=True).wait_for_publish(timeout=2)
            self.mqtt.stop()
            self._broker_state(False, "the agent stopped")
