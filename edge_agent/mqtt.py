"""A small paho-mqtt wrapper used by the hub and the agent: connect with a deadline, reconnect with
exponential backoff from a random first step, and route messages to handlers so that a malformed message is counted
and logged but never kills the network loop."""

from __future__ import annotations

import logging
import random
import ssl
import threading
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import parse_broker
from edge_agent.errors import ConfigError
from edge_agent.mqtt_poll import install as install_poll_select
from edge_agent.tls import client_context, verify_failure

install_poll_select()

log = logging.getLogger(__name__)
Handler = Callable[[str, bytes], None]


class MqttConnection:
    def __init__(
        self,
        url: str,
        client_id: str | None = None,
        *,
        on_connect: Callable[[], None] | None = None,
        will: tuple[str, bytes] | None = None,
        clean_session: bool = True,
        on_state: Callable[[bool, str | None], None] | None = None,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        """``on_state(connected, error)`` hears every connect, refusal, failed attempt and disconnect.
        ``username``/``password``: the MQTT credentials (docs/security.md); the password is never logged.
        ``mqtts://`` URLs connect over TLS: the broker's certificate is verified against ``ca_file`` (or the
        system's CAs) and its host name checked; ``cert_file``/``key_file``: a client certificate (mTLS);
        ``tls_context``: a ready context instead of those three."""
        self.host, self.port, self.tls = parse_broker(url)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"edgefed-{uuid.uuid4().hex[:10]}",
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if not self.tls and (ca_file or cert_file or key_file or tls_context):
            raise ConfigError(f"broker {url}: a CA or client certificate is given but the URL is not mqtts://; "
                              "write it as mqtts://host:port")  # fmt: skip
        if self.tls:  # paho's tls_set with a context of ours: server verified, host name checked, clear errors
            self.client.tls_set_context(tls_context or client_context(ca_file, cert_file, key_file))
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(10_000)
        # exponential backoff 1-30 s; a random first step keeps a fleet from reconnecting in lockstep
        self.client.reconnect_delay_set(min_delay=random.randint(1, 3), max_delay=30)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.on_connect = self._connected
        self.client.on_connect_fail = self._connect_failed
        self.client.on_disconnect = self._disconnected
        self.client.on_message = self._message
        self._on_state = on_state or (lambda connected, error: None)
        self._handlers: list[tuple[str, str, int, Handler]] = []  # (filter, subscription, QoS, handler)
        self._on_connect = on_connect
        self._connected_event = threading.Event()
        self.malformed = 0

    def route(self, pattern: str, handler: Handler, qos: int = 1, shared_as: str | None = None) -> None:
        """Call ``handler(topic, payload)`` for messages matching ``pattern``; subscribes on (re)connect.
        ``shared_as``: subscribe as that shared subscription instead (``topics.shared``), so the broker
        hands each message to one member of its group."""
        subscription = shared_as or pattern
        self._handlers.append((pattern, subscription, qos, handler))
        if self._connected_event.is_set():
            self.client.subscribe(subscription, qos)

    def unroute(self, pattern: str) -> None:
        gone = {h[1] for h in self._handlers if h[0] == pattern}
        self._handlers = [h for h in self._handlers if h[0] != pattern]
        for subscription in gone:
            self.client.unsubscribe(subscription)

    def _connected(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT connection to %s:%d refused: %s", self.host, self.port, reason)
            self._on_state(False, f"connection refused: {reason}")
            return
        log.info("connected to the MQTT broker at %s:%d", self.host, self.port)
        self._on_state(True, None)
        for subscription in dict.fromkeys((h[1], h[2]) for h in self._handlers):
            client.subscribe(*subscription)
        self._connected_event.set()
        if self._on_connect is not None:
            self._on_connect()

    def _connect_failed(self, client: mqtt.Client, userdata: Any) -> None:
        log.warning("cannot reach the MQTT broker at %s:%d; retrying", self.host, self.port)
        self._on_state(False, f"cannot reach the MQTT broker at {self.host}:{self.port}")

    def _disconnected(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("lost the MQTT broker at %s:%d (%s); reconnecting", self.host, self.port, reason)
            self._on_state(False, f"disconnected: {reason}")

    def _message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        for pattern, _, _, handler in list(self._handlers):
            if mqtt.topic_matches_sub(pattern, message.topic):
                try:
                    handler(message.topic, bytes(message.payload))
                except Exception as exc:  # a bad message must never stop the loop
                    self.malformed += 1
                    log.warning("dropped message on %s: %s", message.topic, exc)

    def start_in_background(self) -> None:
        """Connect without waiting: failed attempts are logged and retried with backoff (a device may
        boot before its network or broker is up)."""
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()

    def start(self, timeout_s: float = 10.0) -> None:
        try:
            self.client.connect(self.host, self.port, keepalive=30)
        except OSError as exc:
            reason = verify_failure(exc)
            if reason is not None:
                raise ConfigError(f"the MQTT broker at {self.host}:{self.port} is not trusted: its TLS certificate "
                                  f"does not verify ({reason}); give the CA that signed it (broker_ca, "
                                  "--broker-ca)") from None  # fmt: skip
            raise ConfigError(f"cannot reach the MQTT broker at {self.host}:{self.port}: {exc}") from None
        self.client.loop_start()
        if not self._connected_event.wait(timeout_s):
            self.stop()
            raise ConfigError(f"no MQTT CONNACK from {self.host}:{self.port} within {timeout_s} s")

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    @property
    def connected(self) -> bool:
        return self.client.is_connected()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
