"""paho-mqtt waits on its socket with ``select.select``, which refuses any file descriptor at or above
FD_SETSIZE (1024): in a process that holds that many files (a busy hub, a long test run) the client then
never connects and never says why (paho.mqtt.python issue 819, open). ``install()`` hands paho's module a
``select`` with the same signature built on ``poll()``, which has no such limit."""

from __future__ import annotations

import select
from types import ModuleType
from typing import Any

Sockets = list[Any]


def _fileno(obj: Any) -> int:
    if isinstance(obj, int):
        fd = obj
    else:
        try:
            fd = obj.fileno()
        except AttributeError:  # paho reads a TypeError as "the socket is gone"
            raise TypeError(f"{obj!r} has no file descriptor") from None
    if fd < 0:
        raise ValueError("file descriptor cannot be a negative integer")
    return fd


def poll_select(rlist: Sockets, wlist: Sockets, xlist: Sockets, timeout: float | None = None) -> tuple[Sockets, ...]:
    """``select.select`` for readable and writable lists, on ``poll()``; ``xlist`` is not watched (paho passes
    none). A hang-up or error counts as readable, as select reports it, so the caller's read sees the error."""
    if timeout is not None and timeout < 0:
        raise ValueError("timeout must be non-negative")
    poller = select.poll()
    wanted: dict[int, int] = {}
    for obj in rlist:
        wanted[_fileno(obj)] = wanted.get(_fileno(obj), 0) | select.POLLIN | select.POLLPRI
    for obj in wlist:
        wanted[_fileno(obj)] = wanted.get(_fileno(obj), 0) | select.POLLOUT
    for fd, mask in wanted.items():
        poller.register(fd, mask)
    events = dict(poller.poll(None if timeout is None else timeout * 1000.0))
    failed = select.POLLHUP | select.POLLERR | select.POLLNVAL
    readable = [obj for obj in rlist if events.get(_fileno(obj), 0) & (select.POLLIN | select.POLLPRI | failed)]
    writable = [obj for obj in wlist if events.get(_fileno(obj), 0) & (select.POLLOUT | failed)]
    return readable, writable, []


class _PollSelectModule:
    """What paho's module sees under the name ``select``: our ``select()``, the rest from the real module."""

    def __init__(self, real: ModuleType) -> None:
        self._real = real
        self.select = poll_select

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def install() -> None:
    """Point paho's client module at ``poll_select`` (idempotent; a no-op where ``poll()`` is missing)."""
    import paho.mqtt.client as paho_client

    current = getattr(paho_client, "select")  # noqa: B009 - paho does not export the name
    if hasattr(select, "poll") and not isinstance(current, _PollSelectModule):
        setattr(paho_client, "select", _PollSelectModule(select))  # noqa: B010
