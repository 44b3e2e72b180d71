"""Per-feature likelihood ratios of a window of counts: the evidence the sequential detector adds up.

For one feature with reference proportions p over K bins, each alternative is an exponential tilt of p,
q_j = p_j * exp(t_j) / M with M = sum_j p_j * exp(t_j), where t is theta times a standardized score
(location: mean bin rank; scale: squared rank deviation; see `scores.standardized_scores`). A window with
counts c (n samples) has log-likelihood ratio log(q/p) = t . c - n * log M. Because q is a real
distribution, exp(llr) has expectation exactly 1 under the reference whatever n is: this is what makes
the detector's false-alarm bound hold (see docs/drift.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cloud_hub.drift.scores import standardized_scores

FloatArray = npt.NDArray[np.float64]

ALTERNATIVES = ("mean_up", "mean_down", "spread_up", "spread_down")
"""The four tilts watched per feature, in the order of the columns of `FeatureModel.tilts`."""

SMOOTHING = 0.5
"""Pseudo-count added to every reference bin (Jeffreys prior), so that a bin the reference never saw
has a small, non-zero probability instead of making any live count there impossible."""


@dataclass(frozen=True)
class FeatureModel:
    """One feature's reference and the log-likelihood ratios of its alternatives."""

    proportions: FloatArray  # smoothed reference proportions, K
    tilts: FloatArray  # K x 4: log q_j/p_j + log M for each alternative (t_j)
    log_mgf: FloatArray  # 4: log M of each alternative

    @classmethod
    def from_counts(cls, counts: npt.ArrayLike, *, theta: float) -> FeatureModel:
        raw = np.asarray(counts, dtype=np.float64)
        if raw.ndim != 1 or raw.size < 2 or np.any(raw < 0) or raw.sum() <= 0:
            raise ValueError("reference counts must be a 1-D non-negative array with at least 2 bins")
        smoothed = (raw + SMOOTHING) / (raw.sum() + SMOOTHING * raw.size)
        location, scale = standardized_scores(smoothed)
        tilts = theta * np.stack([location, -location, scale, -scale], axis=1)
        log_mgf = np.log(smoothed @ np.exp(tilts))
        return cls(smoothed, tilts, log_mgf)

    @property
    def bins(self) -> int:
        return int(self.proportions.size)

    def log_ratios(self, counts: npt.ArrayLike) -> FloatArray:
        """Log-likelihood ratio of each alternative for one window (counts: K) or many (W x K -> W x 4)."""
        array = np.asarray(counts, dtype=np.float64)
        if array.shape[-1] != self.bins:
            raise ValueError(f"expected {self.bins} bins, got {array.shape[-1]}")
        n = array.sum(axis=-1, keepdims=True)
        result: FloatArray = array @ self.tilts - n * self.log_mgf
        return result


def mixture_log_ratio(log_ratios: FloatArray, *, weight: float) -> FloatArray:
    """log((1 - w) + w * mean(exp(llr))) over the last axis: this feature is unchanged, or moved one way.

    Still a likelihood ratio with expectation 1 under the reference; the (1 - w) part bounds what an
    unchanged feature can take away from the combined statistic at log(1 - w) per window.
    """
    top = np.max(log_ratios, axis=-1, keepdims=True)
    mean = np.mean(np.exp(log_ratios - top), axis=-1)
    top = top[..., 0]
    result: FloatArray = np.logaddexp(np.log1p(-weight), np.log(weight) + top + np.log(mean))
    return result
