"""The agent's side of hard examples: upload what apps kept in the example spool, one example per MQTT
message (``devices/{id}/examples``, QoS 1, the spool file's bytes as they are), and remove each one
once the hub acknowledges it (``devices/{id}/examples/ack``).

At most ``max_in_flight`` examples are unacknowledged at once (each is up to 1 MiB); one unacknowledged
for ``resend_after_s``, or when the agent reconnects or restarts, is sent again: the hub stores an
example once per id and acknowledges every copy, so an agent killed between the hub's store and the
ack costs a second send, never a second copy. Runs on the agent's thread.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edge_agent.example_spool import ExampleSpool, spool_dir
from edge_agent.mqtt import MqttConnection
from edge_agent.protocol.errors import MessageError
from edge_agent.protocol.messages import HardExample, HardExampleAck, from_wire
from edge_agent.protocol.topics import Topics
from edge_agent.store import kill_point

log = logging.getLogger(__name__)
MAX_IN_FLIGHT = 4
RESEND_AFTER_S = 30.0


class ExampleUploader:
    def __init__(self, state_dir: Path, mqtt: MqttConnection, topics: Topics, device_id: str,
                 max_in_flight: int = MAX_IN_FLIGHT, resend_after_s: float = RESEND_AFTER_S) -> None:  # fmt: skip
        self.spool = ExampleSpool(spool_dir(state_dir), create=False)
        self.mqtt, self.topics, self.device_id = mqtt, topics, device_id
        self.max_in_flight, self.resend_after_s = max_in_flight, resend_after_s
        self.in_flight: dict[str, float] = {}  # example id → when it was sent (monotonic)

    def reset(self, connected_at: float) -> None:
        """After a (re)connection at ``connected_at`` (monotonic): what was sent before it and is still
        unacknowledged is sent again (what was sent since is on this connection already)."""
        self.in_flight = {k: sent for k, sent in self.in_flight.items() if sent >= connected_at}

    def on_ack(self, topic: str, payload: bytes) -> None:
        kill_point("example-ack")  # tests: killed after the hub stored an example, before its ack counts
        ack = from_wire(HardExampleAck, payload)
        self.in_flight.pop(ack.example_id, None)
        if not self.spool.remove(ack.example_id):
            return  # an ack for a copy sent twice
        if ack.error:
            log.warning("the hub refused hard example %s: %s", ack.example_id, ack.error)
        self.spool.count({"refused_by_hub" if ack.error else "uploaded": 1})

    def send(self, now: float) -> int:
        """Publish the oldest examples not in flight, up to ``max_in_flight``; how many were sent. A
        failure (a disk error) is logged and retried on the next call: it never stops the agent."""
        try:
            return self._send(now)
        except OSError as exc:
            log.warning("cannot read the hard-example spool: %s", exc)
            return 0

    def _send(self, now: float) -> int:
        for example_id, sent in list(self.in_flight.items()):
            if now - sent > self.resend_after_s:
                del self.in_flight[example_id]
        if not self.mqtt.connected or len(self.in_flight) >= self.max_in_flight:
            return 0
        sent = 0
        for entry in self.spool.entries():
            if len(self.in_flight) >= self.max_in_flight:
                break
            if entry.example_id in self.in_flight:
                continue
            payload = self.spool.read(entry)
            if payload is None:
                continue
            try:
                HardExample.from_wire(payload)
            except MessageError as exc:  # never sent: the hub would refuse it too
                log.error("removing unreadable hard example %s: %s", entry.path.name, exc)
                entry.path.unlink(missing_ok=True)
                self.spool.count({"unreadable": 1})
                continue
            self.mqtt.publish(self.topics.examples(self.device_id), payload, qos=1)
            self.in_flight[entry.example_id] = now
            sent += 1
        return sent
