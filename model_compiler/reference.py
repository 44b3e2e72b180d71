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


def reference_distribution(x: np.ndarray, outputs: np.ndarray) -> dict[str, Any]:
    """Per-tensor histograms plus mean/std (a summary per tensor, not per feature, for now)."""

    def summary(values: np.ndarray) -> dict[str, Any]:
        return {"mean": float(values.mean()), "std": float(values.std()), "histogram": histogram(values)}

    return {
        "schema": "edgefed.reference/1",
        "samples": len(x),
        "inputs": {"input": summary(x)},
        "outputs": {
            "output": summary(outputs),
            "top1": [int(c) for c in np.bincount(outputs.reshape(len(outputs), -1).argmax(1))],
        },
    }
