"""The embedded MQTT broker (amqtt, MQTT 3.1.1) so a single-machine hub needs nothing else.

For a fleet, point the hub at Mosquitto, EMQX or HiveMQ with ``--broker mqtt://host:port``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from pathlib import Path
from typing import Any

from cloud_hub.errors import BrokerError
from edge_agent.protocol.topics import DEFAULT_ROOT

log = logging.getLogger(__name__)


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on the port now. SO_REUSEADDR as the server itself sets it, so
    connections of a previous run waiting in TIME_WAIT do not count as taken (a restart is immediate)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


class EmbeddedBroker:
    """amqtt running on its own event loop in a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883, *, password_file: Path | None = None,
                 allow_anonymous: bool = True, topic_root: str = DEFAULT_ROOT) -> None:  # fmt: skip
        """``password_file`` (cloud_hub/mqtt_auth.py): authenticate users against it and confine them to
        their topics; anonymous clients only when ``allow_anonymous``. None: the open broker of old."""
        self.host, self.port = host, port
        self.password_file, self.allow_anonymous, self.topic_root = password_file, allow_anonymous, topic_root
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="edgefed-broker", daemon=True)
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> None:
        if not port_is_free(self.host, self.port):
            raise BrokerError(
                f"port {self.port} on {self.host} is taken, so the embedded MQTT broker cannot start. "
                "Choose another with --broker-port PORT, or use the broker already there with "
                f"--broker mqtt://{self.host}:{self.port}"
            )
        try:
            from amqtt.broker import Broker

            from cloud_hub.broker_acl import ConfinedBroker
        except ImportError:
            raise BrokerError("the embedded broker needs amqtt: pip install 'edgefed[hub]'") from None
        plugins: dict[str, Any] = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
        if self.password_file is not None:
            confine = {"password_file": str(self.password_file), "allow_anonymous": self.allow_anonymous,
                       "topic_root": self.topic_root}  # fmt: skip
            plugins = {"cloud_hub.broker_acl.CredentialsPlugin": confine,
                       "cloud_hub.broker_acl.TopicAclPlugin": confine}  # fmt: skip
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": 10000}},
            "plugins": plugins,
        }
        logging.getLogger("amqtt").setLevel(logging.WARNING)
        logging.getLogger("transitions").setLevel(logging.WARNING)
        self._thread.start()

        async def create_and_start() -> Any:
            broker = ConfinedBroker(config) if self.password_file is not None else Broker(config)
            await broker.start()
            return broker

        self._broker = asyncio.run_coroutine_threadsafe(create_and_start(), self._loop).result(timeout=15)
        log.info("embedded MQTT broker listening on %s", self.url)

    def stop(self) -> None:
        if self._broker is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(timeout=10)
            except Exception:  # shutting down anyway; a stuck broker must not block exit
                log.exception("embedded broker shutdown failed")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
