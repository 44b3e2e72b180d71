"""The admin API's server: uvicorn in a background thread with its own event loop, on a socket bound
before it starts (port 0 works: ``port`` is the real one), http or https with the hub's SSLContext
(cloud_hub/tls_serve.py)."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from cloud_hub.api.gate import BAD_CONTENT_LENGTH
from cloud_hub.errors import HubError

log = logging.getLogger(__name__)
MAX_HEAD_BYTES = 64 * 1024  # a request head longer than this goes to h11 as it is (which refuses it)
STARTUP_S, SHUTDOWN_S = 10.0, 5


def guard_head(head: bytes) -> bytes:
    """A request head with each malformed Content-Length renamed (``X-Edgefed-Bad-Content-Length``): h11
    would answer it with a bare 400 before the app sees it; the gate refuses it in JSON, and audits it."""
    lines = head.split(b"\r\n")
    for i, line in enumerate(lines[1:], 1):
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"content-length" and not value.strip().isdigit():
            lines[i] = BAD_CONTENT_LENGTH.encode() + b":" + value
    return b"\r\n".join(lines)


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with :func:`guard_head` applied to the head of each request."""

    _head = b""

    def data_received(self, data: bytes) -> None:
        if self._head or self.conn.their_state is h11.IDLE:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0 and len(self._head) < MAX_HEAD_BYTES:
                self._unset_keepalive_if_required()
                return  # the rest of the head is on its way
            data = guard_head(self._head[:end]) + self._head[end:] if end >= 0 else self._head
            self._head = b""
        super().data_received(data)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:  # a port taken: `cloud-hub serve` names --admin-port
        sock.close()
        raise
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class BackgroundServer:
    """One uvicorn server for ``app`` on ``host:port``, in a daemon thread."""

    def __init__(self, app: Any, host: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
        self.sock = bind(host, port)
        self.port: int = self.sock.getsockname()[1]
        config = uvicorn.Config(app, http=GuardedH11, ws="none", lifespan="off", loop="asyncio", log_config=None,
                                log_level=logging.WARNING,
                                access_log=False, proxy_headers=False, server_header=False,
                                timeout_graceful_shutdown=SHUTDOWN_S)  # fmt: skip
        config.load()
        config.ssl = ssl_context  # the hub's own context (TLS 1.2 or later), not one made from file names
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="edgefed-admin", daemon=True)
        self._failed: BaseException | None = None

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # SystemExit from uvicorn included: say so, never kill the hub
            self._failed = exc
            log.exception("the admin API server stopped")

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + STARTUP_S
        while not self.server.started:
            if self._failed is not None or not self._thread.is_alive() or time.monotonic() > deadline:
                raise HubError(f"the admin API did not start ({self._failed or 'timed out'}); see the hub log")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(SHUTDOWN_S + 5)
        self.sock.close()
