"""Health gates: the telemetry of a rollout's new version on a wave's devices against the previous
version's on the same devices. ``Tally`` keeps running totals per (model, version, device), fed from
the telemetry the hub stores (in arrival order, from a cursor), so a gate costs no scan of history."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cloud_hub.metrics import quantile_ms
from cloud_hub.registry import Registry
from cloud_hub.rollouts.spec import Gates
from edge_agent.protocol.messages import LATENCY_EDGES_MS

log = logging.getLogger(__name__)


@dataclass
class Totals:
    calls: int = 0
    errors: int = 0
    cloud: int = 0  # calls that went to the cloud (the fallback rate)
    local: int = 0
    breaches: int = 0
    latency: np.ndarray = field(default_factory=lambda: np.zeros(len(LATENCY_EDGES_MS) + 1, np.int64))

    def add(self, other: Totals) -> None:
        self.calls, self.errors, self.cloud = (
            self.calls + other.calls,
            self.errors + other.errors,
            self.cloud + other.cloud,
        )
        self.local, self.breaches = self.local + other.local, self.breaches + other.breaches
        self.latency = self.latency + other.latency

    def minus(self, earlier: Totals) -> Totals:
        calls, errors, cloud = self.calls - earlier.calls, self.errors - earlier.errors, self.cloud - earlier.cloud
        local, breaches = self.local - earlier.local, self.breaches - earlier.breaches
        return Totals(calls, errors, cloud, local, breaches, self.latency - earlier.latency)

    def to_json(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in ("calls", "errors", "cloud", "local", "breaches")},
                "latency": self.latency.tolist()}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Totals:
        return cls(data["calls"], data["errors"], data["cloud"], data["local"], data["breaches"],
                   np.asarray(data["latency"], np.int64))  # fmt: skip

    def figures(self) -> dict[str, float]:
        calls = max(self.calls, 1)
        return {"calls": self.calls, "error_rate": self.errors / calls, "fallback_rate": self.cloud / calls,
                "breach_rate": self.breaches / max(self.local, 1),
                "p95_ms": quantile_ms(self.latency.tolist(), 0.95)}  # fmt: skip


class Tally:
    """Running totals per (model, version, device) of the telemetry windows stored so far."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.cursor = 0
        self.totals: dict[tuple[str, str, str], Totals] = defaultdict(Totals)

    def catch_up(self, limit: int = 2000) -> None:
        while rows := self.registry.telemetry_after(self.cursor, limit):
            for row in rows:
                try:
                    for w in row["windows"]:
                        self._add(row["device_id"], w)
                except (ValueError, OverflowError, KeyError, TypeError) as exc:  # one bad batch, not the rollouts
                    log.warning("rollout tally skips batch %s of %s: %s", row.get("seq"), row.get("device_id"), exc)
            self.cursor = rows[-1]["cursor"]
            if len(rows) < limit:
                return

    def _add(self, device: str, w: dict[str, Any]) -> None:
        totals = self.totals[(w["model"], w["version"], device)]
        totals.calls += w["count"]
        totals.errors += w["errors"]
        if w["route"] == "cloud":
            totals.cloud += w["count"]
        if w["route"] == "local":
            totals.local += w["count"]
            totals.breaches += w.get("budget_breaches", 0)
            hist = w.get("latency_hist") or []
            if len(hist) == len(totals.latency):
                totals.latency += np.asarray(hist, np.int64)

    def sum(
        self,
        model: str,
        versions: dict[str, str | None],
    ) -> Totals:
        """Totals over devices, each for the version given for it (None: none)."""
        total = Totals()
        for device, version in versions.items():
            if version is not None and (model, version, device) in self.totals:
                total.add(self.totals[(model, version, device)])
        return total


def judge(gates: Gates, new: Totals, old: Totals, drift_score: float | None) -> tuple[bool | None, str, dict[str, Any]]:
    """(passed — None while there are too few calls to tell, the reason, the figures)."""
    now, before = new.figures(), old.figures()
    figures = {"new": now, "previous": before, "drift_score": drift_score}
    if new.calls < gates.min_calls:
        return None, f"{new.calls} of {gates.min_calls} calls so far", figures
    failures = []
    if now["error_rate"] > gates.max_error_rate:
        failures.append(f"error rate {now['error_rate']:.1%} > {gates.max_error_rate:.1%}")
    if old.calls >= gates.min_calls:
        checks = (("error rate", "error_rate", gates.max_error_ratio), ("fallback rate", "fallback_rate",
                  gates.max_fallback_ratio), ("budget breaches", "breach_rate", gates.max_breach_ratio))  # fmt: skip
        for label, key, ratio in checks:
            if now[key] > ratio * before[key] + gates.slack:
                failures.append(f"{label} {now[key]:.1%} > {ratio:g} x {before[key]:.1%} + {gates.slack:.0%}")
        limit = gates.max_p95_ratio * before["p95_ms"] + gates.latency_slack_ms
        if not math.isnan(now["p95_ms"]) and not math.isnan(before["p95_ms"]) and now["p95_ms"] > limit:
            failures.append(f"p95 latency {now['p95_ms']:.3f} ms > {gates.max_p95_ratio:g} x "
                            f"{before['p95_ms']:.3f} ms + {gates.latency_slack_ms:g} ms")  # fmt: skip
    if gates.max_drift_score is not None and drift_score is not None and drift_score >= gates.max_drift_score:
        failures.append(f"drift score {drift_score:.2f} ≥ {gates.max_drift_score:g}")
    if failures:
        return False, "; ".join(failures), figures
    return True, "gates passed", figures
