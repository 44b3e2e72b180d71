"""What the inference processes count: cloud calls per device and model (cost tracking, flushed to the
registry) and per-model statistics, which worker processes share through small files."""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from pathlib import Path

from cloud_hub.registry import Registry
from edge_agent.protocol.atomic import atomic_write_bytes

# (model name, version) → [success, fail, success_ns, last_inference_ms, executions]
Statistics = dict[tuple[str, str], list[int]]


def merge_statistics(into: Statistics, rows: Statistics) -> None:
    """Add ``rows`` to ``into``: counts add up, the last inference is the latest."""
    for key, (success, fail, success_ns, last_ms, executions) in rows.items():
        total = into.setdefault(key, [0, 0, 0, 0, 0])
        total[0] += success
        total[1] += fail
        total[2] += success_ns
        total[3] = max(total[3], last_ms)
        total[4] += executions


def write_statistics(directory: Path, rows: Statistics) -> None:
    """This process's statistics, for the other workers (``{pid}.json``, replaced atomically)."""
    payload = [[name, version, *row] for (name, version), row in rows.items()]
    atomic_write_bytes(directory / f"{os.getpid()}.json", json.dumps(payload).encode())


def peer_statistics(directory: Path) -> Statistics:
    """What the other worker processes (alive or not) last wrote."""
    totals: Statistics = {}
    for file in directory.glob("*.json"):
        if file.stem != str(os.getpid()):
            merge_statistics(totals, {(name, version): row for name, version, *row in json.loads(file.read_bytes())})
    return totals


class UsageCounter:
    """Cloud calls per (device, model); drained into the registry by the hub."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def add(self, device: str, model: str) -> None:
        with self._lock:
            self.counts[(device, model)] += 1

    def drain(self) -> Counter[tuple[str, str]]:
        with self._lock:
            drained, self.counts = self.counts, Counter()
        return drained

    def flush_to(self, registry: Registry) -> None:
        counts = self.drain()
        if counts:
            registry.add_usage(dict(counts))
