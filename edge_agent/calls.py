"""Calls as the spool keeps them: packed per (model, version, route) (timestamp f8, latency f4, flags u1:
13 bytes a call; flags bit 0 = success, bit 1 = over the latency budget), tensor histogram counts per
model version, and the aggregation of packed calls into the telemetry windows the hub receives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.protocol.messages import LATENCY_EDGES_MS, TelemetryWindow

MAX_LATENCY_MS = 1e9  # a latency that is not a finite number is stored as 0 (NaN) or clipped to this (inf)
OK, OVER_BUDGET = 1, 2  # bits of a call's flags byte (the calls table's ``ok`` column)
_EDGES = np.asarray(LATENCY_EDGES_MS)


@dataclass(frozen=True)
class CallBlock:
    """The calls of one (model, version, route), packed."""

    model: str
    version: str
    route: str
    ts: np.ndarray  # float64 Unix seconds
    latency_ms: np.ndarray  # float32
    ok: np.ndarray  # uint8 flags: OK | OVER_BUDGET

    def row(self) -> tuple[Any, ...]:
        return (self.model, self.version, self.route, len(self.ts), self.ts.astype("<f8").tobytes(),
                self.latency_ms.astype("<f4").tobytes(), self.ok.astype(np.uint8).tobytes())  # fmt: skip

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> CallBlock:
        model, version, route, _, ts, latency, ok = row
        return cls(model, version, route, np.frombuffer(ts, "<f8"), np.frombuffer(latency, "<f4"),
                   np.frombuffer(ok, np.uint8))  # fmt: skip

    @property
    def breaches(self) -> int:
        return int(np.count_nonzero(self.ok & OVER_BUDGET))


@dataclass(frozen=True)
class TensorCounts:
    """One tensor's histogram over the ``summarised`` of ``calls`` calls of a model version."""

    model: str
    version: str
    tensor: str
    edges: np.ndarray
    counts: np.ndarray
    calls: int
    summarised: int


def aggregate(blocks: list[CallBlock]) -> tuple[TelemetryWindow, ...]:
    """One window per (model, version, route): counts, errors (flag bit 0 clear), budget breaches (bit 1
    set), latency sum and histogram."""
    groups: dict[tuple[str, str, str], list[CallBlock]] = {}
    for block in blocks:
        groups.setdefault((block.model, block.version, block.route), []).append(block)
    windows = []
    for (model, version, route), parts in sorted(groups.items()):
        ts = np.concatenate([p.ts for p in parts])
        latency = _finite(np.concatenate([p.latency_ms for p in parts]).astype(np.float64))
        flags = np.concatenate([p.ok for p in parts])
        hist = np.bincount(np.searchsorted(_EDGES, latency, side="left"), minlength=len(_EDGES) + 1)
        windows.append(TelemetryWindow(
            model=model, version=version, route=route, start=float(ts.min()), end=float(ts.max()),
            count=len(ts), errors=int(np.count_nonzero((flags & OK) == 0)),
            latency_ms_sum=round(float(latency.sum()), 6), latency_hist=tuple(int(c) for c in hist),
            budget_breaches=int(np.count_nonzero(flags & OVER_BUDGET)),
        ))  # fmt: skip
    return tuple(windows)


def _finite(latency: np.ndarray) -> np.ndarray:
    """Latencies the hub accepts: NaN as 0, the rest clipped to [0, MAX_LATENCY_MS]."""
    if np.isfinite(latency).all() and (latency >= 0).all():
        return latency
    clipped: np.ndarray = np.clip(np.nan_to_num(latency, nan=0.0), 0.0, MAX_LATENCY_MS)
    return clipped
