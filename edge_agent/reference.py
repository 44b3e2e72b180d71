"""Reference bins from an artifact's ``reference.json``, and histograms of tensors on those bins."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ReferenceBins:
    """Bin edges per tensor name (inputs and outputs)."""

    edges: dict[str, np.ndarray]

    @classmethod
    def load(cls, directory: Path) -> ReferenceBins | None:
        try:
            data = json.loads((directory / "reference.json").read_text())
        except (OSError, ValueError):
            return None
        edges = {}
        for section in ("inputs", "outputs"):
            for name, summary in (data.get(section) or {}).items():
                hist = summary.get("histogram") if isinstance(summary, dict) else None
                if hist and len(hist.get("edges", [])) >= 2:
                    edges[name] = np.asarray(hist["edges"], dtype=np.float64)
        return cls(edges) if edges else None


def bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of ``values`` on ``edges``; values outside the range land in the first or last bin, so
    a shifted distribution still shows up (that is what drift detection looks for)."""
    bins = len(edges) - 1
    flat = np.asarray(values).ravel()
    width = (edges[-1] - edges[0]) / bins
    if width > 0 and np.allclose(np.diff(edges), width, rtol=1e-4, atol=0):  # uniform bins: arithmetic, no search
        index = ((flat - edges[0]) * (1.0 / width)).astype(np.int64)
    else:
        index = np.searchsorted(edges, flat.astype(np.float64), side="right") - 1
    return np.bincount(np.clip(index, 0, bins - 1), minlength=bins)
