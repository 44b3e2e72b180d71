"""Reference distributions for drift detection: histograms of inputs and outputs on validation data."""

from __future__ import annotations

from typing import Any

import numpy as np

from model_compiler.data import is_numeric

BINS = 20
MAX_LABEL = 4096  # integer label outputs up to this value get class counts


def histogram(values: np.ndarray, bins: int = BINS) -> dict[str, Any]:
    flat = values.reshape(-1).astype(np.float64)
    low, high = float(flat.min()), float(flat.max())
    if high <= low:
        high = low + 1.0
    counts, edges = np.histogram(flat, bins=bins, range=(low, high))
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


def reference_distribution(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per-tensor histograms plus mean/std, keyed by the model's tensor names (a summary per tensor, not
    per feature, for now), and the class counts of a classifier's output (the top-1 of its scores, or
    its integer labels). Tensors that are not numbers (strings) have no histogram and are left out."""

    def summary(values: np.ndarray) -> dict[str, Any]:
        values = values.astype(np.float64)
        return {"mean": float(values.mean()), "std": float(values.std()), "histogram": histogram(values)}

    first = next(iter(outputs.values()))
    return {
        "schema": "edgefed.reference/1",
        "samples": len(first),
        "inputs": {name: summary(a) for name, a in inputs.items() if is_numeric(a) and a.size},
        "outputs": {name: summary(a) for name, a in outputs.items() if is_numeric(a) and a.size},
        "top1": class_counts(first),
    }


def class_counts(output: np.ndarray) -> list[int]:
    """How often each class came first: argmax of float scores, or the value of non-negative integer
    labels; empty for anything else (strings, regressions with one value per row)."""
    if not output.size:
        return []
    flat = output.reshape(len(output), -1)
    if output.dtype.kind == "f" and flat.shape[1] > 1:
        return [int(c) for c in np.bincount(flat.argmax(1))]
    if output.dtype.kind in "iu" and flat.shape[1] == 1 and flat.min() >= 0 and flat.max() <= MAX_LABEL:
        return [int(c) for c in np.bincount(flat[:, 0].astype(np.int64))]
    return []
