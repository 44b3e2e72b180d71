"""Reference distributions for drift detection: histograms of inputs and outputs on validation data."""

from __future__ import annotations

from typing import Any

import numpy as np

BINS = 20


def histogram(values: np.ndarray, bins: int = BINS) -> dict[str, Any]:
    flat = values.reshape(-1).astype(np.float64)
    low, high = float(flat.min()), float(flat.max())
    if high <= low:
        high = low + 1.0
    counts, edges = np.histogram(flat, bins=bins, range=(low, high))
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


def reference_distribution(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per-tensor histograms plus mean/std, keyed by the model's tensor names (a summary per tensor, not
    per feature, for now), and the top-1 class counts of a classifier's output."""

    def summary(values: np.ndarray) -> dict[str, Any]:
        values = values.astype(np.float64)
        return {"mean": float(values.mean()), "std": float(values.std()), "histogram": histogram(values)}

    first = next(iter(outputs.values()))
    return {
        "schema": "edgefed.reference/1",
        "samples": len(first),
        "inputs": {name: summary(a) for name, a in inputs.items()},
        "outputs": {name: summary(a) for name, a in outputs.items()},
        "top1": [int(c) for c in np.bincount(first.reshape(len(first), -1).argmax(1))],
    }
