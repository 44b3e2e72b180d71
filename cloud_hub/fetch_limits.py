"""Per-device limits on artifact chunk requests (``devices/{id}/fetch``), so a few bytes of requests
cannot make the hub publish megabytes (docs/security.md, "Resource limits").

Two token buckets per device:

- requests: at most ``requests_per_s`` fetch requests a second (burst ``2 * requests_per_s``); a request
  over it is dropped whole;
- chunks, per artifact: the bucket holds ``2 * C`` chunks (C: the artifact's chunk count) and refills at
  ``C / window_s`` a second: a full fetch and a full re-ask at once, then one full artifact per
  ``window_s``. A request asking for more than is left gets what is left (lowest chunk first); the device
  asks again for the rest after its stall timeout, as it does after a loss.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

MAX_TRACKED = 100_000  # buckets kept; past that, the full (idle) ones are forgotten


@dataclass
class _Bucket:
    tokens: float
    stamp: float

    def take(self, cost: float, rate: float, capacity: float, now: float, partial: bool) -> float:
        """Refill, then take up to ``cost`` (all or nothing unless ``partial``); what was taken."""
        self.tokens = min(capacity, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        granted = min(cost, self.tokens) if partial else (cost if self.tokens >= cost else 0.0)
        self.tokens -= granted
        return granted


class FetchLimiter:
    def __init__(self, requests_per_s: float = 20.0, window_s: float = 10.0) -> None:
        self.requests_per_s, self.window_s = requests_per_s, window_s
        self._requests: dict[str, _Bucket] = {}
        self._chunks: dict[tuple[str, str], _Bucket] = {}
        self._lock = threading.Lock()
        self.refused_requests = 0  # requests dropped whole
        self.refused_chunks = 0  # chunks asked for and not sent

    @property
    def enabled(self) -> bool:
        return self.requests_per_s > 0 and self.window_s > 0

    def admit(self, device_id: str, artifact_id: str, wanted: set[tuple[int, int]],
              artifact_chunks: int) -> set[tuple[int, int]]:  # fmt: skip
        """The chunks of ``wanted`` this device may have sent now."""
        if not self.enabled or not wanted:
            return wanted
        now = time.monotonic()
        with self._lock:
            if len(self._requests) + len(self._chunks) > MAX_TRACKED:
                self._forget_idle(now)
            burst = 2 * self.requests_per_s
            requests = self._requests.setdefault(device_id, _Bucket(burst, now))
            if not requests.take(1, self.requests_per_s, burst, now, partial=False):
                self.refused_requests += 1
                self.refused_chunks += len(wanted)
                return set()
            capacity = 2.0 * artifact_chunks
            chunks = self._chunks.setdefault((device_id, artifact_id), _Bucket(capacity, now))
            taken = chunks.take(len(wanted), artifact_chunks / self.window_s, capacity, now, partial=True)
            granted = int(taken)
            chunks.tokens += taken - granted  # whole chunks only: the fraction stays in the bucket
            self.refused_chunks += len(wanted) - granted
            return wanted if granted == len(wanted) else set(sorted(wanted)[:granted])

    def _forget_idle(self, now: float) -> None:
        self._requests = {k: b for k, b in self._requests.items() if now - b.stamp < 2.0}
        self._chunks = {k: b for k, b in self._chunks.items() if now - b.stamp < 2 * self.window_s}
