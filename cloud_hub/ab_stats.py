"""The figures of an A/B test and their 95 % confidence intervals (docs/ab.md).

- rates (error, fallback, the share of calls B got): Wilson score intervals; a difference of two rates:
  Newcombe's hybrid score interval (from the two Wilson intervals);
- latency quantiles (p50, p95) from the telemetry's latency histograms: the distribution-free interval
  of order statistics (ranks ``n q ± z sqrt(n q (1 - q))``) read through the histogram;
- the output distribution (class counts per version, from the ``*/class`` drift features): a G-test of
  homogeneity of the 2 x k table, with its p-value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import special  # type: ignore[import-untyped]  # no stubs in the dev env

from cloud_hub.metrics import quantile_ms

Z95 = 1.959963984540054
ALPHA = 0.05


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion; (0, 1) without trials."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(successes: int, trials: int) -> dict[str, Any]:
    low, high = wilson(successes, trials)
    return {"value": successes / trials if trials else None, "ci95": [low, high], "count": successes}


def difference(b: tuple[int, int], a: tuple[int, int]) -> dict[str, Any]:
    """B's rate minus A's with Newcombe's interval; ``significant`` when it excludes 0."""
    (xb, nb), (xa, na) = b, a
    if nb <= 0 or na <= 0:
        return {"value": None, "ci95": None, "significant": False}
    pb, pa = xb / nb, xa / na
    lb, ub = wilson(xb, nb)
    la, ua = wilson(xa, na)
    d = pb - pa
    low = d - math.sqrt((pb - lb) ** 2 + (ua - pa) ** 2)
    high = d + math.sqrt((ub - pb) ** 2 + (pa - la) ** 2)
    return {"value": d, "ci95": [low, high], "significant": low > 0 or high < 0}


def quantile(hist: Sequence[int], q: float) -> dict[str, Any]:
    """The ``q`` latency quantile (ms) and its distribution-free 95 % interval."""
    n = int(sum(hist))
    if n == 0:
        return {"value": None, "ci95": None}
    spread = Z95 * math.sqrt(n * q * (1 - q))
    low_q, high_q = max(0.0, (n * q - spread) / n), min(1.0, (n * q + spread + 1) / n)
    return {"value": quantile_ms(hist, q), "ci95": [quantile_ms(hist, low_q), quantile_ms(hist, high_q)]}


def homogeneity(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """G-test that A's and B's class counts come from one distribution (classes seen by neither left out)."""
    table = np.asarray([a, b], dtype=np.float64)
    table = table[:, table.sum(axis=0) > 0]
    n = table.sum()
    dof = table.shape[1] - 1
    if dof <= 0 or table.sum(axis=1).min() <= 0:
        return {"g": 0.0, "dof": max(dof, 0), "p_value": 1.0, "significant": False}
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / n
    mask = table > 0
    g = max(2.0 * float(np.sum(table[mask] * np.log(table[mask] / expected[mask]))), 0.0)
    p = float(special.chdtrc(dof, g))
    return {"g": g, "dof": dof, "p_value": p, "significant": p < ALPHA}


def verdict(label_a: str, label_b: str, figures: dict[str, Any], comparison: dict[str, Any], min_calls: int) -> str:
    """One line for operators: what differs significantly, or that nothing does (yet)."""
    calls = (figures["a"]["calls"], figures["b"]["calls"])
    if min(calls) < min_calls:
        return (
            f"too few calls to judge: {calls[0]} on A ({label_a}), {calls[1]} on B ({label_b}); {min_calls} each needed"
        )
    found = []
    for key, label in (("error_rate", "error rate"), ("fallback_rate", "fallback rate")):
        diff = comparison[key]
        if diff["significant"]:
            worse = "higher" if diff["value"] > 0 else "lower"
            found.append(f"{label} {worse} on B ({diff['value'] * 100:+.2f} pp, 95% CI "
                         f"{diff['ci95'][0] * 100:+.2f}..{diff['ci95'][1] * 100:+.2f})")  # fmt: skip
    for key in ("p50_ms", "p95_ms"):
        a, b = figures["a"][key]["ci95"], figures["b"][key]["ci95"]
        if a and b and (b[0] > a[1] or b[1] < a[0]):
            worse = "slower" if b[0] > a[1] else "faster"
            values = figures["b"][key]["value"], figures["a"][key]["value"]
            found.append(f"{key[:3]} {worse} on B ({values[0]:.3f} vs {values[1]:.3f} ms)")
    for feature, test in comparison.get("outputs", {}).items():
        if test["significant"]:
            found.append(f"{feature} distribution differs (G-test p={test['p_value']:.2g})")
    if not found:
        return f"no significant difference between A ({label_a}) and B ({label_b}) at 95%"
    return f"B ({label_b}) vs A ({label_a}): " + "; ".join(found)
