"""`edge-agent run`: the daemon that keeps a device's models in the desired state and ships telemetry.

MQTT callbacks only enqueue work; one agent thread verifies, installs and reports, so a slow install
never stalls the network loop and a malformed message never stops the daemon. Every install step is
journaled (``InstallJournal``) and every step is idempotent, so an agent killed anywhere converges on
restart: to the new version active, or a reported failure with the previous version serving. The install
steps (fetch, check, activate, resume) are the ``Installer`` mixin in ``install.py``; ``health_check`` is
importable from here too.
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

from device_profiles import get_profile
from edge_agent import __version__
from edge_agent.ab_agent import AbFollower
from edge_agent.active_watch import ActiveWatch
from edge_agent.config import AgentConfig
from edge_agent.desired_guard import DesiredGuard, models_to_follow, record_override
from edge_agent.example_upload import ExampleUploader
from edge_agent.install import Installer
from edge_agent.install import health_check as health_check
from edge_agent.journal import JOURNAL_DIR, InstallJournal
from edge_agent.mqtt import MqttConnection
from edge_agent.protocol.atomic import atomic_write_bytes
from edge_agent.protocol.errors import MessageError
from edge_agent.protocol.manifest import now_text
from edge_agent.protocol.messages import (
    DesiredModel,
    DesiredRequest,
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
from edge_agent.protocol.topics import Topics
from edge_agent.store import ModelStore
from edge_agent.telemetry import SPOOL_FILE, Spool
from edge_agent.transfer import Transfer
from edge_agent.trust import artifact_trust, held_keyset, hub_trust, take_keyset

log = logging.getLogger(__name__)
STALL_S = 3.0
ASK_DESIRED_AFTER_S = 2.0  # after a connection, ask for the desired state if none arrived by then
AGENT_STATUS_FILE = "agent-status.json"


class Agent(Installer):
    def __init__(self, state_dir: Path, config: AgentConfig) -> None:
        self.state_dir, self.config = state_dir, config
        self.profile = get_profile(config.profile)
        self.store = ModelStore(state_dir / "models")
        self.trust = artifact_trust(state_dir)  # the signed key set's keys less the revoked (edge_agent/trust.py)
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
            username=config.mqtt_username,
            password=config.mqtt_password,
            ca_file=config.broker_ca,  # mqtts:// brokers (docs/security.md, "TLS")
            cert_file=config.broker_cert,
            key_file=config.broker_key,
        )
        self.mqtt.route(self.topics.desired(self.device_id), self._enqueue(self._on_desired))
        self.mqtt.route(self.topics.telemetry_ack(self.device_id), self._enqueue(self._on_ack))
        self.examples = ExampleUploader(state_dir, self.mqtt, self.topics, self.device_id)  # opt-in hard examples
        self.mqtt.route(self.topics.examples_ack(self.device_id), self._enqueue(self.examples.on_ack))
        self.mqtt.route(self.topics.device_chunks(self.device_id), self._enqueue(self._on_chunk))
        self.mqtt.route(self.topics.keyset(self.device_id), self._enqueue(self._on_keyset))
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
        self.refused_desired: bytes | None = None  # the last desired state refused (tried again on a new key set)
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
            self.refused_desired = payload
            self._publish_reported()
            return
        self.refused_desired = None
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

    def _on_keyset(self, topic: str, payload: bytes) -> None:
        """A signed key set from the hub: taken (stored first) when a hub key this device holds signed it and
        it is newer; then artifacts and desired states are checked with it, and a desired state refused for
        want of the new hub key is tried again. A refused one changes nothing (docs/security.md)."""
        if not payload:
            return
        try:
            taken = take_keyset(self.state_dir, payload)
        except MessageError as exc:
            log.error("%s", exc)
            return
        if taken is None:
            return
        log.info("took key set version %d: hub keys %s, %d trusted artifact keys, %d revoked", taken.version,
                 ", ".join(sorted(taken.roots)), len(taken.artifact_trust().keys), len(taken.revoked))  # fmt: skip
        self.trust, self.guard.hub_keys = artifact_trust(self.state_dir), hub_trust(self.state_dir)
        self._publish_reported()
        if self.refused_desired is not None:
            self._on_desired(topic, self.refused_desired)

    def _clean_downloads(self) -> None:
        """Remove finished or abandoned downloads: anything not being fetched for the desired state."""
        downloads = self.state_dir / "downloads"
        for path in downloads.iterdir() if downloads.is_dir() else []:
            if path.name not in self.transfers:
                shutil.rmtree(path, ignore_errors=True)

    # reported state --------------------------------------------------------------------------------
    def _publish_reported(self) -> None:
        self._note_local_switches()  # a local switch since the last look is reported as one, never absorbed
        for name in self.store.names():
            active = self.store.active(name)
            if active and name not in self.reported:
                self.reported[name] = ReportedModel(name, "active", active.version, active.artifact_id)
        state = ReportedState(self.device_id, self.profile.id, __version__, now_text(),
                              tuple(map(self.ab.attach, self.reported.values())), self.desired_error,
                              self.guard.counter, self._keyset_version())  # fmt: skip
        self.mqtt.publish(self.topics.reported(self.device_id), reported_to_wire(state), retain=True)
        self.journal.remove_final()

    def _keyset_version(self) -> int:
        try:
            held = held_keyset(self.state_dir)
        except ValueError:
            return 0
        return held.version if held is not None else 0

    def _watch_active(self) -> None:
        """Report at once an active version switched by another process (a local `edge-agent rollback`):
        it stands as a device-side override until the hub's next desired state (docs/security.md)."""
        if self._note_local_switches():
            self._publish_reported()

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
