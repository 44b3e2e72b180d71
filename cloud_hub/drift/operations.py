"""Drift in how a model version runs, from the telemetry windows every call feeds: error rate, fallback
rate (the share of calls by route), latency and latency-budget breaches.

These have no compile-time reference, so each stream (model, version, scope) takes its own: the counts
of its first BASELINE_CALLS calls. After that its windows go to a `SequentialDetector` on that baseline,
watching only for the bins' mean to rise (errors, calls away from the local route, breaches, slower calls),
with the same false-alarm bound as the data features; an alarm raises ``operations:MODEL@VERSION:SCOPE``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cloud_hub.drift.sequential import SequentialDetector
from edge_agent.protocol.messages import LATENCY_EDGES_MS

BASELINE_CALLS = 2000
ROUTES = ("local", "cloud", "cache")
FEATURES = ("ops/errors", "ops/route", "ops/budget", "ops/latency")  # what each counts, in order below
WATCH = ("mean_up",)  # only getting worse matters: more errors, fallbacks, breaches, slower calls; and a
# stream steadier than its own baseline (all calls in one latency bin) must not look like drift


def window_counts(windows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """Per model version of one telemetry batch: [ok, errors]; calls per ROUTES; local [within, over]
    budget; the local latency histogram (on LATENCY_EDGES_MS plus overflow)."""
    found: dict[tuple[str, str], dict[str, np.ndarray]] = defaultdict(
        lambda: {"ops/errors": np.zeros(2, np.int64), "ops/route": np.zeros(len(ROUTES), np.int64),
                 "ops/budget": np.zeros(2, np.int64), "ops/latency": np.zeros(len(LATENCY_EDGES_MS) + 1, np.int64)}
    )  # fmt: skip
    for w in windows:
        counts = found[(w["model"], w["version"])]
        counts["ops/errors"] += [w["count"] - w["errors"], w["errors"]]
        if w["route"] in ROUTES:
            counts["ops/route"][ROUTES.index(w["route"])] += w["count"]
        if w["route"] == "local":
            breaches = w.get("budget_breaches", 0)
            counts["ops/budget"] += [w["count"] - breaches, breaches]
            hist = w.get("latency_hist") or []
            if len(hist) == len(LATENCY_EDGES_MS) + 1:
                counts["ops/latency"] += np.asarray(hist, np.int64)
    return dict(found)


@dataclass
class OperationsBaseline:
    """A stream's baseline while it is being collected, then its detector."""

    counts: dict[str, np.ndarray] = field(default_factory=dict)
    calls: int = 0
    detector: SequentialDetector | None = None

    def add(self, counts: dict[str, np.ndarray], calls: int, false_alarms_per_100k: float,
            window_calls: int) -> bool:  # fmt: skip
        """Add to the baseline; True when it is complete (and the detector made)."""
        for name, values in counts.items():
            self.counts[name] = self.counts[name] + values if name in self.counts else values.copy()
        self.calls += calls
        if self.calls < BASELINE_CALLS:
            return False
        reference = {name: values for name, values in self.counts.items() if values.sum()}
        self.detector = SequentialDetector(reference, false_alarms_per_100k=false_alarms_per_100k,
                                           window_calls=window_calls, watch=WATCH)  # fmt: skip
        return True

    def state(self) -> dict[str, Any]:
        return {"baseline": {n: v.tolist() for n, v in self.counts.items()}, "calls": self.calls,
                "detector": self.detector.state() if self.detector is not None else None}  # fmt: skip

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> OperationsBaseline:
        counts = {name: np.asarray(values, np.int64) for name, values in state["baseline"].items()}
        restored = cls(counts, int(state["calls"]))
        if state.get("detector") is not None:
            reference = {name: values for name, values in counts.items() if values.sum()}
            restored.detector = SequentialDetector.from_state(reference, state["detector"])
        return restored
