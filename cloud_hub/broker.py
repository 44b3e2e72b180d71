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
                 allow_anonymous: bool = True, topic_root: str = DEFAULT_ROOT, tls_port: int | None = None,
                 certfile: Path | None = None, keyfile: Path | None = None,
                 tls_only: bool = False) -> None:  # fmt: skip
        """``password_file`` (cloud_hub/mqtt_auth.py): authenticate users against it and confine them to
        their topics; anonymous clients only when ``allow_anonymous``. None: the open broker of old.
        ``tls_port``: also listen with TLS there (``certfile``/``keyfile``); ``tls_only``: only there (no
        plain listener on ``port``)."""
        if tls_port is not None and (certfile is None or keyfile is None):
            raise BrokerError("the embedded broker's TLS listener needs a certificate: give --tls-cert and --tls-key")
        if tls_only and tls_port is None:
            raise BrokerError("--broker-tls-only needs --broker-tls-port PORT (and --tls-cert, --tls-key)")
        self.tls_port, self.certfile, self.keyfile, self.tls_only = tls_port, certfile, keyfile, tls_only
        self.host, self.port = host, port
        self.password_file, self.allow_anonymous, self.topic_root = password_file, allow_anonymous, topic_root
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="edgefed-broker", daemon=True)
        self._broker: Any = None

    @property
    def url(self) -> str:
        """The URL clients use: the TLS listener's (``mqtts://``) when it is the only one."""
        return self.tls_url if self.tls_only else f"mqtt://{self.host}:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"mqtts://{self.host}:{self.tls_port}" if self.tls_port is not None else ""

    def start(self) -> None:
        if self.tls_port is not None and not port_is_free(self.host, self.tls_port):
            raise BrokerError(f"port {self.tls_port} on {self.host} is taken, so the embedded MQTT broker's TLS "
                              "listener cannot start; choose another with --broker-tls-port PORT")  # fmt: skip
        if not self.tls_only and not port_is_free(self.host, self.port):
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
        listeners: dict[str, dict[str, Any]] = {}
        if not self.tls_only:
            listeners["default"] = {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": 10000}
        if self.tls_port is not None:  # amqtt requires a listener named "default": the TLS one when it is alone
            listeners["tls" if listeners else "default"] = {
                "type": "tcp", "bind": f"{self.host}:{self.tls_port}", "max_connections": 10000, "ssl": True,
                "certfile": str(self.certfile), "keyfile": str(self.keyfile),
            }  # fmt: skip
        config = {"listeners": listeners, "plugins": plugins}
        logging.getLogger("amqtt").setLevel(logging.WARNING)
        logging.getLogger("transitions").setLevel(logging.WARNING)
        self._thread.start()

        async def create_and_start() -> Any:
            broker = ConfinedBroker(config) if self.password_file is not None else Broker(config)
            await broker.start()
            return broker

        self._broker = asyncio.run_coroutine_threadsafe(create_and_start(), self._loop).result(timeout=15)
        log.info("embedded MQTT broker listening on %s", " and ".join(
            u for u in ("" if self.tls_only else f"mqtt://{self.host}:{self.port}", self.tls_url) if u))  # fmt: skip

    def stop(self) -> None:
        if self._broker is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(timeout=10)
            except Exception:  # shutting down anyway; a stuck broker must not block exit
                log.exception("embedded broker shutdown failed")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
