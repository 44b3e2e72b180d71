"""The MQTT control plane: desired state out, reported state / status / telemetry in, and artifact
chunks served on request (``chunk_rounds.py``)."""

from __future__ import annotations

import dataclasses
import logging
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from cloud_hub.artifacts import Artifacts
from cloud_hub.chunk_rounds import ChunkRounds
from cloud_hub.desired_signing import DesiredSigner
from cloud_hub.errors import Conflict, NotFound
from cloud_hub.mqtt_auth import hub_user
from cloud_hub.registry import Registry
from device_profiles import DeviceProfile, ProfileError, get_profile
from edge_agent.errors import ConfigError
from edge_agent.mqtt import MqttConnection
from edge_agent.protocol.errors import ArtifactRejected, MessageError
from edge_agent.protocol.manifest import Manifest, manifest_from_wire, now_text
from edge_agent.protocol.messages import (
    DesiredAB,
    DesiredModel,
    DesiredRequest,
    DesiredState,
    ReportedState,
    Status,
    TelemetryAck,
    TelemetryBatch,
    desired_digest,
    from_wire,
    short_error,
    to_wire,
)
from edge_agent.protocol.topics import Topics
from edge_agent.protocol.topics import shared as shared_subscription
from edge_agent.store import check_compatible

log = logging.getLogger(__name__)


class ControlPlane(ChunkRounds):
    def __init__(self, broker_url: str, registry: Registry, store: Artifacts, topics: Topics,
                 max_chunk_rate: float = 0.0, fetch_window_s: float = 0.1,
                 shared_above: float = 0.5, signer: DesiredSigner | None = None,
                 credentials: tuple[str, str] | None = None, tls_context: ssl.SSLContext | None = None,
                 replica: str | None = None) -> None:  # fmt: skip
        self.registry, self.store, self.topics = registry, store, topics
        self.signer = signer  # signs desired states (docs/security.md); None: unsigned, as before issue 13
        # (device, model, version) → the B side of an A/B test for that desired model (cloud_hub/ab.py)
        self.ab_for: Callable[[str, str, str], DesiredAB | None] | None = None
        # credentials: the hub's MQTT user (cloud_hub/mqtt_auth.py); its client id is its alone on a broker
        # that confines (the embedded one, or Mosquitto as `cloud-hub broker-config` writes it)
        username, password = credentials if credentials is not None else (None, None)
        # replica: one of several hubs (cloud_hub/leader.py): its own client id, device messages through the
        # replicas' shared subscriptions, chunk requests answered only while it leads
        self.replica = replica
        self.leading: Callable[[], bool] = lambda: True
        client_id = hub_user(replica)  # the user's own client id (cloud_hub/mqtt_auth.py)
        self.mqtt = MqttConnection(broker_url, client_id=client_id, clean_session=True,
                                   on_connect=self.republish_desired, username=username,
                                   password=password, tls_context=tls_context)  # fmt: skip
        self._republished_at: dict[str, float] = {}  # device → when its desired state was last sent again
        self.device_route("reported", self._on_reported)
        self.device_route("status", self._on_status)
        self.mqtt.route(topics.all_devices("fetch"), self._on_fetch)  # every replica hears it; the leader acts
        self.device_route("desired/get", self._on_desired_request)
        self.device_route("telemetry", self._on_telemetry)
        self._desired_lock = threading.Lock()  # one desired state read, signed and published at a time
        self._stop = threading.Event()
        self.telemetry_stored = 0  # batches this hub stored (a replica: its share)
        self.init_chunk_rounds(max_chunk_rate, fetch_window_s, shared_above)

    def device_route(self, leaf: str, handler: Callable[[str, bytes], None]) -> None:
        """Hear ``leaf`` of every device: alone, or as one of the replicas' shared subscription."""
        pattern = self.topics.all_devices(leaf)
        self.mqtt.route(pattern, handler, shared_as=shared_subscription(pattern) if self.replica else None)

    def start(self, connect_timeout_s: float = 5.0) -> None:
        """Connect to the broker; one that cannot be reached within ``connect_timeout_s`` (restarting
        too, or not up yet) is logged and retried in the background, so the hub still starts."""
        try:
            self.mqtt.start(connect_timeout_s)
        except ConfigError as exc:
            log.warning("%s; the hub keeps trying and sends every desired state once connected", exc)
            self.mqtt.start_in_background()
        self._sender.start()

    def stop(self) -> None:
        self._stop.set()
        with self._pending_lock:
            self._pending_lock.notify_all()
        self._sender.join(timeout=5)
        self.mqtt.stop()

    def _on_reported(self, topic: str, payload: bytes) -> None:
        device_id = self._device(topic)
        if not payload:
            return
        try:
            state = from_wire(ReportedState, payload)
        except MessageError as exc:  # keep what it last said, marked: the operator sees why it is stale
            self._mark_report_refused(device_id, str(exc))
            raise  # and counted as malformed, like any other
        if state.device_id != device_id:
            raise ValueError(f"reported state for {state.device_id} on {device_id}'s topic")
        now = time.time()  # received_at: when the hub got it, on the hub's clock (the device's may differ)
        fields = {
            "profile": state.profile,
            "reported": {**dataclasses.asdict(state), "received_at": now},
            "last_seen": now,
        }
        self._update_from_device(device_id, fields)
        self._republish_if_unheard(device_id, {m.name for m in state.models})

    def _on_desired_request(self, topic: str, payload: bytes) -> None:
        device_id = self._device(topic)
        request = from_wire(DesiredRequest, payload)
        rows = self.registry.desired(device_id)
        if rows and request.have != desired_digest(r["artifact_id"] for r in rows):
            self._republish(device_id, rows[-1]["deployment_id"])

    def _mark_report_refused(self, device_id: str, reason: str) -> None:
        try:
            last = self.registry.device(device_id)["reported"] or {}
        except NotFound:
            return
        error = short_error(f"report refused by the hub: {reason}")
        now = time.time()
        self._update_from_device(
            device_id, {"reported": {**last, "error": error, "received_at": now}, "last_seen": now}
        )

    def _on_status(self, topic: str, payload: bytes) -> None:
        if payload:
            status = from_wire(Status, payload)
            self._update_from_device(self._device(topic), {"status": status.state, "last_seen": time.time()})

    def _update_from_device(self, device_id: str, fields: dict[str, Any]) -> None:
        if not self.registry.update_from_device(device_id, **fields):
            log.info("ignoring a message from removed device %s (enroll it again to re-admit it)", device_id)

    def _on_telemetry(self, topic: str, payload: bytes) -> None:
        device_id = self._device(topic)
        batch = from_wire(TelemetryBatch, payload)
        if batch.device_id != device_id:
            raise ValueError(f"telemetry for {batch.device_id} on {device_id}'s topic")
        if self.registry.add_telemetry(batch):  # a duplicate is acknowledged again, never stored twice
            self.telemetry_stored += 1
        self.mqtt.publish(self.topics.telemetry_ack(device_id), to_wire(TelemetryAck(batch.seq, batch.epoch)))

    def deploy(self, name: str, version: str, target: str) -> dict[str, Any]:
        """Resolve the target, pick each device's artifact, record the deployment, publish desired state."""
        if not self.registry.artifacts(name, version):
            raise NotFound(f"model {name}@{version} has no artifact; add one with 'cloud-hub models add'")
        return self.deploy_devices(name, version, self._resolve(target), target)

    def deploy_devices(self, name: str, version: str, devices: list[dict[str, Any]], target: str,
                       rollback: bool = False) -> dict[str, Any]:  # fmt: skip
        """``deploy`` to these device records (a rollout's wave), recorded under the label ``target``;
        an ordinary deploy (not ``rollback``) ends any rollback authorised for that model on them."""
        if not self.registry.artifacts(name, version):
            raise NotFound(f"model {name}@{version} has no artifact; add one with 'cloud-hub models add'")
        assignments = {d["device_id"]: self._artifact_for(name, version, d) for d in devices}
        for device_id, artifact_id in assignments.items():
            self._check_desired_fits(device_id, (name, version, artifact_id))
        if self.signer is not None and not rollback:
            self.signer.clear_rollback(name, list(assignments))
        deployment_id = self.registry.create_deployment(name, version, target, assignments)
        for device_id in assignments:
            self.publish_desired(device_id, deployment_id)
        return {"deployment_id": deployment_id, "devices": assignments}

    def _resolve(self, target: str) -> list[dict[str, Any]]:
        devices = self.registry.devices_matching(target)
        if not devices:
            raise NotFound(f"no device matches {target!r}; see 'cloud-hub devices list'")
        return devices

    def _artifact_for(self, name: str, version: str, device: dict[str, Any]) -> str:
        try:
            profile: DeviceProfile = get_profile(device["profile"] or "")
        except ProfileError:
            raise Conflict(f"device {device['device_id']} has unknown profile {device['profile']!r}") from None
        candidates, too_large = [], []
        for row in self.registry.artifacts(name, version):
            manifest: Manifest = manifest_from_wire(self.registry.artifact(row["artifact_id"])["manifest"])
            try:
                check_compatible(manifest, profile)
            except ArtifactRejected:
                continue
            if manifest.total_size > profile.max_artifact_bytes:
                too_large.append(manifest.total_size)
                continue
            candidates.append((manifest.hardware.profile == profile.id, manifest.release, manifest.artifact_id))
        if not candidates:
            limit = f"{profile.id}'s {profile.max_artifact_mb} MiB limit"
            why = (f"its artifact ({min(too_large)} bytes) is over {limit}" if too_large
                   else f"compile one with 'model-compiler compile ... --profile {profile.id}'")  # fmt: skip
            raise Conflict(f"no artifact of {name}@{version} fits device {device['device_id']} "
                           f"(profile {profile.id}): {why}")  # fmt: skip
        return max(candidates)[2]

    def republish_desired(self) -> None:
        """Publish every device's desired state again: the registry is the source of truth, and a broker
        that restarted without persistence, or another broker, no longer holds the retained messages.
        Runs at every (re)connection to the broker, so also when the hub starts."""
        count = 0
        for device in self.registry.devices():
            rows = self.registry.desired(device["device_id"])
            try:
                if rows:
                    self.publish_desired(device["device_id"], rows[-1]["deployment_id"])
                    count += 1
            except Exception:  # one device's state must not keep the others from theirs
                log.exception("cannot publish the desired state of %s again", device["device_id"])
        if count:
            log.info("published the desired state of %d devices again", count)

    def _republish_if_unheard(self, device_id: str, reported: set[str], every_s: float = 30.0) -> None:
        """A device that reports none of a model it should run never got its desired state (a lost
        retained message): send it again, at most every ``every_s`` per device."""
        rows = self.registry.desired(device_id)
        if rows and not {r["model"] for r in rows} <= reported:
            self._republish(device_id, rows[-1]["deployment_id"], every_s)

    def _republish(self, device_id: str, deployment_id: str, every_s: float = 30.0) -> None:
        """``publish_desired`` again, at most every ``every_s`` per device (a device asking in a loop
        cannot make the hub flood it)."""
        now = time.monotonic()
        if now - self._republished_at.get(device_id, -every_s) >= every_s:
            self._republished_at[device_id] = now
            self.publish_desired(device_id, deployment_id)

    def _desired_models(self, device_id: str, new: tuple[str, str, str] | None = None) -> list[DesiredModel]:
        """The models ``device_id`` should run, with ``new`` (a deploy's name, version, artifact) in place
        of its name's."""
        rows = [(r["model"], r["version"], r["artifact_id"]) for r in self.registry.desired(device_id)]
        if new is not None:
            rows = [r for r in rows if r[0] != new[0]] + [new]
        models = []
        for model, version, artifact_id in rows:
            artifact = self.registry.artifact(artifact_id)
            rollback = self.signer is not None and self.signer.is_rollback(device_id, model, artifact_id)
            ab = self.ab_for(device_id, model, version) if self.ab_for is not None else None
            models.append(DesiredModel(model, version, artifact_id, artifact["manifest"], artifact["signature"],
                                       rollback=rollback, ab=ab))  # fmt: skip
        return models

    def _check_desired_fits(self, device_id: str, new: tuple[str, str, str]) -> None:
        """Refuse a deploy whose desired state the device would refuse (too many models, too big)."""
        try:
            to_wire(DesiredState("check", now_text(), tuple(self._desired_models(device_id, new))))
        except MessageError as exc:
            raise Conflict(f"cannot deploy {new[0]}@{new[1]} to {device_id}: {exc}") from None

    def publish_desired(self, device_id: str, deployment_id: str) -> None:
        """Publish the device's desired state, signed (``signer``): the same signed message again when
        nothing changed for a deployment the device already had, a new counter for a new decision."""

        def state() -> DesiredState:
            return DesiredState(deployment_id, now_text(), tuple(self._desired_models(device_id)))

        with self._desired_lock:  # read, sign, publish as one: the newest content always goes out last
            # replicas: read under the signer's row lock (another replica may deploy meanwhile); one hub reads
            # first (on SQLite the registry's connection must not wait inside the stores' write transaction)
            wanted = state if self.replica else state()
            payload = self.signer.payload(device_id, wanted) if self.signer is not None else to_wire(state())
            self.mqtt.publish(self.topics.desired(device_id), payload, qos=1, retain=True)

    def rollback(self, name: str, version: str, target: str) -> dict[str, Any]:
        """A signed rollback: ``deploy`` whose desired states authorise a release below the installed one
        (``DesiredModel.rollback``) on exactly the targeted devices, recorded as a deployment."""
        return self.rollback_devices(name, version, self._resolve(target), target)

    def rollback_devices(self, name: str, version: str, devices: list[dict[str, Any]], target: str) -> dict[str, Any]:
        """``rollback`` of these device records (a rollout's), recorded as one deployment labelled ``target``."""
        if self.signer is None:
            raise Conflict("a rollback needs the hub's desired-state key (the hub makes it on start)")
        if not self.registry.artifacts(name, version):
            raise NotFound(f"model {name}@{version} has no artifact; add one with 'cloud-hub models add'")
        marks = {d["device_id"]: self._artifact_for(name, version, d) for d in devices}
        self.signer.mark_rollback(name, marks)
        try:
            result = self.deploy_devices(name, version, devices, target, rollback=True)
        except Exception:  # nothing was decided: no mark may outlive it
            self.signer.clear_rollback(name, list(marks))
            raise
        self.signer.record_rollback_deployment(result["deployment_id"])
        return {**result, "rollback": True}
