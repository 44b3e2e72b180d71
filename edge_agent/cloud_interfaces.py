"""Interfaces of models a device has no local version of, as the cloud describes them (ModelMetadata),
so the SDK can check inputs and name outputs before and after a cloud call.

Asked at most once per ``ttl_s`` per model (60 s: a new version's interface is picked up within a
minute), only while the cloud breaker is closed; an unreachable cloud counts against the breaker and is
asked again after ``retry_s``. A server without ModelMetadata (UNIMPLEMENTED) leaves inputs unchecked
there: the server itself refuses what it cannot take.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from edge_agent.cloud import CloudClient
from edge_agent.errors import CloudUnavailable
from edge_agent.protocol.manifest import Interface
from edge_agent.routing import CLOSED, CircuitBreaker
from edge_agent.runtimes import InputValidator


@dataclass(frozen=True)
class _Known:
    interface: Interface | None
    validator: InputValidator | None
    expires: float


class CloudInterfaces:
    def __init__(self, cloud: CloudClient, breaker: CircuitBreaker, timeout_s: float, ttl_s: float = 60.0,
                 retry_s: float = 1.0) -> None:  # fmt: skip
        self.cloud, self.breaker, self.timeout_s, self.ttl_s, self.retry_s = cloud, breaker, timeout_s, ttl_s, retry_s
        self._known: dict[str, _Known] = {}
        self._lock = threading.Lock()

    def validator(self, model: str) -> InputValidator | None:
        return self._entry(model).validator

    def interface(self, model: str) -> Interface | None:
        return self._entry(model).interface

    def cached(self, model: str) -> Interface | None:
        """What is known now, without asking (the output names of a call in flight)."""
        known = self._known.get(model)
        return known.interface if known else None

    def _entry(self, model: str) -> _Known:
        known = self._known.get(model)
        now = time.monotonic()
        if (known is not None and now < known.expires) or self.breaker.state is not CLOSED:
            return known or _Known(None, None, 0.0)
        try:
            interface = self.cloud.interface(model, "", self.timeout_s)  # ModelNotDeployed: the caller's answer
        except CloudUnavailable:
            self.breaker.failure()
            return self._remember(model, known.interface if known else None, now + self.retry_s)
        return self._remember(model, interface, now + self.ttl_s)

    def _remember(self, model: str, interface: Interface | None, expires: float) -> _Known:
        known = _Known(interface, InputValidator(interface) if interface else None, expires)
        with self._lock:
            self._known[model] = known
        return known
