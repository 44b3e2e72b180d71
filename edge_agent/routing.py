"""Routing pieces of the SDK: fallback policies, a circuit breaker per route, confidence measures for
the cascade, and a per-device cloud budget.

Policies:
    local_only    never call the cloud
    cloud_only    always call the cloud
    local_first   local; the cloud when there is no local version, the local runtime raises, or its
                  breaker is open (3 runtime errors in a row open it for 5 s)
    cloud_first   cloud; local when the cloud fails, is throttled or its breaker is open
    cascade       local, then the cloud's (bigger) model when the local answer's confidence is below
                  the threshold, within the latency budget; the local answer when the cloud cannot help

A local call slower than the latency budget is never a reason to leave the local route: it is counted
(``EdgeClient.budget_breaches``, telemetry windows' ``budget_breaches``, `edge-agent status`) and said
in the result's ``reason``. Loading and warming a model never count against the budget.
"""

from __future__ import annotations

import threading
import time
from typing import Literal

import numpy as np

POLICIES = ("local_only", "cloud_only", "local_first", "cloud_first", "cascade")
Confidence = Literal["max_softmax", "margin", "entropy"]
CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    """closed → (``failure_threshold`` consecutive failures) → open → (``reset_timeout_s``) → half-open,
    where ``probes`` calls may test the route: a success closes it, a failure opens it again.

    ``allow`` and ``success`` take no lock while the breaker is closed and healthy (the hot path).
    """

    def __init__(self, failure_threshold: int = 3, reset_timeout_s: float = 1.0, probes: int = 1) -> None:
        self.failure_threshold, self.reset_timeout_s, self.probes = failure_threshold, reset_timeout_s, probes
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.in_flight_probes = 0
        self.opened_count = 0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        if self.state is CLOSED:
            return True
        with self._lock:
            if self.state is OPEN and time.monotonic() - self.opened_at >= self.reset_timeout_s:
                self.state, self.in_flight_probes = HALF_OPEN, 0
            if self.state is HALF_OPEN and self.in_flight_probes < self.probes:
                self.in_flight_probes += 1
                return True
            return self.state is CLOSED

    def success(self) -> None:
        if self.state is CLOSED and self.failures == 0:
            return
        with self._lock:
            self.state, self.failures = CLOSED, 0

    def failure(self) -> None:
        with self._lock:
            self.failures += 1
            if self.state is HALF_OPEN or (self.state is CLOSED and self.failures >= self.failure_threshold):
                self.state, self.opened_at = OPEN, time.monotonic()
                self.opened_count += 1


class RateBudget:
    """Token bucket: at most ``per_minute`` calls a minute, with bursts up to that many."""

    def __init__(self, per_minute: float) -> None:
        self.capacity = self.tokens = float(per_minute)
        self.rate = per_minute / 60.0
        self.updated = time.monotonic()
        self.throttled = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return True
            self.throttled += 1
            return False


def _probabilities(logits: np.ndarray) -> np.ndarray:
    row = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1)
    if np.all(row >= 0) and np.allclose(row.sum(axis=1), 1.0, atol=1e-3):
        return row  # already probabilities
    shifted: np.ndarray = np.exp(row - row.max(axis=1, keepdims=True))
    probabilities: np.ndarray = shifted / shifted.sum(axis=1, keepdims=True)
    return probabilities


def confidence(output: np.ndarray, measure: Confidence) -> float:
    """Confidence of a (batch of) classifier outputs, the lowest over the batch, in [0, 1].

    max_softmax: the top probability; margin: top minus second; entropy: 1 - normalised entropy.
    """
    p = _probabilities(output)
    if measure == "max_softmax":
        return float(p.max(axis=1).min())
    if measure == "margin":
        top2 = np.sort(p, axis=1)[:, -2:]
        return float((top2[:, 1] - top2[:, 0]).min())
    if measure == "entropy":
        entropy = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=1) / np.log(p.shape[1])
        return float((1.0 - entropy).min())
    raise ValueError(f"unknown confidence measure {measure!r}; use max_softmax, margin or entropy")
