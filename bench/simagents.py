"""Simulated agents shared by the fleet benches (`fleet.py`, `rollout.py`): many devices speaking the
agent's MQTT protocol, driven from one select() loop per process (`common.drive`), no store, no runtime.

A `SimAgent` keeps a persistent session, a retained `online` status with an `offline` Last Will and a
retained reported state. On a desired state it checks the manifest's signature against the trusted
artifact keys, reports `downloading`, asks for the chunks, checks each chunk's and each file's sha256 and
reports the model `active`.

Given the hub's desired-state keys (`hub_keys`) it also follows the rule of docs/security.md: a desired
state must verify with a hub key, name this device and carry a counter above the last one accepted (the
very same signed message again is a repeat); an artifact whose release is below one it installed is
refused as a `downgrade` unless the hub's signed desired state marks it `rollback`. An artifact it already
holds (fetched and checked before) is activated at once, without a fetch (the real agent re-verifies the
files on disk; the simulation trusts what it checked when it fetched them). A refusal is reported as the
reported state's `error`.

Given a `behaviour` per version it answers with telemetry, as an app calling the active version would
cause: every `interval_s` one `TelemetryBatch` window of about `rate * interval_s` local calls, with
that version's error rate and its latencies (log-normal around `latency_ms`) counted on the agent's
latency histogram bins.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.protocol.desired_signing import verify_desired
from edge_agent.protocol.errors import MessageError
from edge_agent.protocol.manifest import manifest_from_wire, now_text
from edge_agent.protocol.messages import (
    LATENCY_EDGES_MS,
    Chunk,
    DesiredState,
    FetchRequest,
    ReportedModel,
    ReportedState,
    Status,
    TelemetryBatch,
    TelemetryWindow,
    from_wire,
    to_wire,
)
from edge_agent.protocol.signing import TrustStore, verify_document
from edge_agent.protocol.topics import Topics

PROFILE = "x86-64-generic"
TOPICS = Topics()
STALL_S = 2.0  # no chunk for this long while fetching: ask again for the missing ones
_BINS = np.asarray((0.0, *LATENCY_EDGES_MS, np.inf))


@dataclass(frozen=True)
class Behaviour:
    """How a model version behaves on a simulated device (what its telemetry says)."""

    error_rate: float = 0.002
    latency_ms: float = 2.0  # median of the local calls' latency
    sigma: float = 0.25  # log-normal spread

    @classmethod
    def table_from_json(cls, text: str) -> dict[str, Behaviour]:
        return {version: cls(**fields) for version, fields in json.loads(text).items()}

    @staticmethod
    def table_to_json(table: dict[str, Behaviour]) -> str:
        return json.dumps({version: dataclasses.asdict(b) for version, b in table.items()})


class SimAgent:
    """One device: the agent's MQTT conversation, chunks checked against the signed manifest."""

    def __init__(self, device_id: str, port: int, trust: TrustStore, hub_keys: TrustStore | None = None,
                 behaviour: dict[str, Behaviour] | None = None, rate: float = 10.0,
                 interval_s: float = 1.0) -> None:  # fmt: skip
        self.device_id, self.trust, self.hub_keys = device_id, trust, hub_keys
        self.model: ReportedModel | None = None  # what it reports: the version active or being fetched
        self.serving: str | None = None  # the version active (its app's calls go to it)
        self.installed: dict[str, tuple[str, int]] = {}  # artifact id → (version, release), fetched and checked
        self.ever_active: set[str] = set()  # every version it ever ran
        self.error: str | None = None  # why it refused its last desired state
        self.counter, self.last_desired = 0, b""  # the last signed desired state accepted
        self.manifest: Any = None
        self.chunks: dict[tuple[int, int], bytes] = {}
        self.last_chunk = 0.0
        self.behaviour, self.rate, self.interval_s = behaviour, rate, interval_s
        self.epoch, self.seq = uuid.uuid4().hex[:12], 0
        self.rng = np.random.default_rng(int(hashlib.sha256(device_id.encode()).hexdigest()[:8], 16))
        self.next_window = time.time() + random.uniform(0, interval_s)  # staggered across the fleet
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311,
                                  clean_session=False)  # fmt: skip
        self.client.max_inflight_messages_set(100)
        self.client.will_set(TOPICS.status(device_id), to_wire(Status("offline", now_text())), qos=1, retain=True)
        self.client.on_message = self.on_message
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.publish(TOPICS.status(device_id), to_wire(Status("online", now_text())))
        self.report()
        self.client.subscribe(TOPICS.desired(device_id), qos=1)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1, retain=True)

    def report(self) -> None:
        models = (self.model,) if self.model else ()
        state = ReportedState(self.device_id, PROFILE, "sim", now_text(), models, self.error, self.counter)
        self.publish(TOPICS.reported(self.device_id), to_wire(state))

    def on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == TOPICS.desired(self.device_id):
            self.on_desired(bytes(message.payload))
        elif self.manifest is not None:
            self.on_chunk(Chunk.from_wire(bytes(message.payload)))

    def refuse(self, why: str) -> None:
        self.error = why
        self.report()

    def on_desired(self, payload: bytes) -> None:
        if self.hub_keys is None:
            desired = from_wire(DesiredState, payload)
        else:
            try:
                desired = verify_desired(payload, self.hub_keys, self.device_id)
            except MessageError as exc:  # DesiredStateRefused is one
                return self.refuse(str(exc))
            if desired.counter < self.counter or (desired.counter == self.counter and payload != self.last_desired):
                return self.refuse(f"desired state refused: counter {desired.counter} is not above "
                                   f"{self.counter}, the last one this device accepted")  # fmt: skip
            repeat = desired.counter == self.counter
            self.counter, self.last_desired = desired.counter, payload
            if repeat:
                return None
        offer = desired.models[0]
        if self.model is not None and self.model.artifact_id == offer.artifact_id:
            return None
        verify_document(offer.manifest, offer.signature, self.trust)
        manifest = manifest_from_wire(offer.manifest)
        assert manifest.artifact_id == offer.artifact_id
        highest = max((release for _, release in self.installed.values()), default=0)
        rollback = offer.rollback and self.hub_keys is not None  # honoured only in a verified signed state
        if manifest.release < highest and not rollback:
            return self.refuse(f"downgrade: release {manifest.release} of {offer.name} is below the installed "
                               f"release {highest}")  # fmt: skip
        self.error = None
        if self.manifest is not None:  # a fetch under way for another artifact: dropped
            self.client.unsubscribe(TOPICS.chunks(self.manifest.artifact_id))
            self.manifest, self.chunks = None, {}
        if offer.artifact_id in self.installed:
            return self.activate(ReportedModel(offer.name, "active", offer.version, offer.artifact_id))
        self.manifest = manifest
        self.model = ReportedModel(offer.name, "downloading", offer.version, offer.artifact_id)
        self.client.subscribe(TOPICS.chunks(offer.artifact_id), qos=1)
        self.report()
        self.ask(everything=True)
        return None

    def activate(self, model: ReportedModel) -> None:
        assert model.version is not None
        self.model, self.serving = model, model.version
        self.ever_active.add(model.version)
        self.report()

    def ask(self, everything: bool = False) -> None:
        wanted = {(f, c) for f, entry in enumerate(self.manifest.files) for c in range(len(entry.chunks))}
        missing = () if everything else tuple(sorted(wanted - set(self.chunks)))
        self.client.publish(TOPICS.fetch(self.device_id), to_wire(FetchRequest(self.manifest.artifact_id, missing)),
                            qos=1)  # fmt: skip
        self.last_chunk = time.monotonic()

    def on_chunk(self, chunk: Chunk) -> None:
        self.last_chunk = time.monotonic()
        key = (chunk.file_index, chunk.chunk_index)
        entry = self.manifest.files[chunk.file_index]
        if key in self.chunks or hashlib.sha256(chunk.data).hexdigest() != entry.chunks[chunk.chunk_index]:
            return
        self.chunks[key] = chunk.data
        if len(self.chunks) < self.manifest.chunk_count:
            return
        for f, file in enumerate(self.manifest.files):
            whole = b"".join(self.chunks[(f, c)] for c in range(len(file.chunks)))
            assert hashlib.sha256(whole).hexdigest() == file.sha256, file.path
        self.client.unsubscribe(TOPICS.chunks(self.manifest.artifact_id))
        assert self.model is not None and self.model.version is not None
        self.installed[self.manifest.artifact_id] = (self.model.version, self.manifest.release)
        self.manifest, self.chunks = None, {}
        self.activate(dataclasses.replace(self.model, state="active"))

    def stalled(self, now: float) -> bool:
        return self.manifest is not None and now - self.last_chunk > STALL_S

    def tick(self, now: float) -> None:
        """Ask again when a fetch stalled; send a telemetry window when one is due."""
        if self.stalled(time.monotonic()):
            self.ask()
        if self.behaviour is None or now < self.next_window:
            return
        start, self.next_window = self.next_window - self.interval_s, self.next_window + self.interval_s
        if self.serving is None or self.model is None:
            return
        behaviour = self.behaviour.get(self.serving, Behaviour())
        count = int(self.rng.poisson(self.rate * self.interval_s))
        errors = int(self.rng.binomial(count, behaviour.error_rate))
        latency = self.rng.lognormal(np.log(behaviour.latency_ms), behaviour.sigma, count)  # errors too, as the SDK
        hist = tuple(int(c) for c in np.histogram(latency, _BINS)[0])
        window = TelemetryWindow(self.model.name, self.serving, "local", start, now, count, errors,
                                 float(latency.sum()), hist)  # fmt: skip
        self.seq += 1
        batch = TelemetryBatch(self.device_id, self.seq, (window,), epoch=self.epoch)
        self.client.publish(TOPICS.telemetry(self.device_id), to_wire(batch), qos=1)

    def held(self) -> dict[str, Any]:
        """What it holds, for the bench to compare with the hub's view."""
        return {"model": dataclasses.asdict(self.model) if self.model else None, "error": self.error,
                "counter": self.counter, "ever_active": sorted(self.ever_active)}  # fmt: skip
