"""Drift scores of live histogram counts against reference counts on the same bins.

Pure functions on two count arrays of equal length (the reference's and the live window's). Bins are
ordered (quantile bins of one feature), except for class counts, where only the omnibus scores
(PSI, Jensen-Shannon, G-test) are meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import special  # type: ignore[import-untyped]  # no stubs in the dev env

FloatArray = npt.NDArray[np.float64]

PSI_EPSILON = 1e-4
"""Floor on each bin's proportion in PSI, so that an empty bin (reference or live) gives a large but
finite term instead of an infinite one. 1e-4 is the floor most PSI tools use; a bin that holds 10 % of the
live counts and none of the reference then adds 0.1 * ln(0.1 / 1e-4) = 0.69."""


@dataclass(frozen=True)
class GTest:
    """Likelihood-ratio (G) test of live counts against the reference proportions."""

    statistic: float
    dof: int
    p_value: float


def _as_counts(counts: npt.ArrayLike) -> FloatArray:
    array = np.asarray(counts, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D array, got shape {array.shape}")
    if not (array.min() >= 0 and np.isfinite(array.max())):
        raise ValueError("counts must be finite and non-negative")
    return array


def _pair(reference: npt.ArrayLike, live: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    ref, cur = _as_counts(reference), _as_counts(live)
    if ref.shape != cur.shape:
        raise ValueError(f"reference has {ref.size} bins, live has {cur.size}")
    if ref.sum() <= 0:
        raise ValueError("reference counts are all zero")
    return ref, cur


def proportions(counts: npt.ArrayLike) -> FloatArray:
    """Counts divided by their total (all zeros stay zeros)."""
    array = _as_counts(counts)
    total = array.sum()
    return array / total if total > 0 else array


def psi(reference: npt.ArrayLike, live: npt.ArrayLike, *, epsilon: float = PSI_EPSILON) -> float:
    """Population stability index: sum over bins of (q - p) * ln(q / p), proportions floored at epsilon.

    0 for identical proportions; by the usual rule of thumb < 0.1 is stable and > 0.25 is a major shift.
    Live counts that are all zero give 0 (nothing observed).
    """
    ref, cur = _pair(reference, live)
    if cur.sum() == 0:
        return 0.0
    p = np.maximum(ref / ref.sum(), epsilon)
    q = np.maximum(cur / cur.sum(), epsilon)
    return float(np.sum((q - p) * np.log(q / p)))


def js_distance(reference: npt.ArrayLike, live: npt.ArrayLike) -> float:
    """Jensen-Shannon distance (square root of the divergence, base 2): 0 identical, 1 disjoint."""
    ref, cur = _pair(reference, live)
    if cur.sum() == 0:
        return 0.0
    p, q = ref / ref.sum(), cur / cur.sum()
    m = (p + q) / 2
    divergence = (_kl_bits(p, m) + _kl_bits(q, m)) / 2
    return float(np.sqrt(max(divergence, 0.0)))


def _kl_bits(p: FloatArray, m: FloatArray) -> float:
    mask = p > 0
    return float(np.sum(p[mask] * np.log2(p[mask] / m[mask])))


def g_test(reference: npt.ArrayLike, live: npt.ArrayLike) -> GTest:
    """G-test of goodness of fit: G = 2 * sum o * ln(o / e), e = n_live * reference proportion.

    Bins with no reference count are left out of the test (their expected count is zero) unless the
    live window has counts there, in which case the fit is rejected outright (G = inf, p = 0).
    Degrees of freedom: reference bins with counts, minus one.
    """
    ref, cur = _pair(reference, live)
    n = cur.sum()
    support = ref > 0
    dof = int(support.sum()) - 1
    if n == 0 or dof <= 0:
        return GTest(0.0, max(dof, 0), 1.0)
    if np.any(cur[~support] > 0):
        return GTest(float("inf"), dof, 0.0)
    observed = cur[support]
    expected = n * ref[support] / ref.sum()
    mask = observed > 0
    statistic = 2.0 * float(np.sum(observed[mask] * np.log(observed[mask] / expected[mask])))
    statistic = max(statistic, 0.0)
    return GTest(statistic, dof, float(special.chdtrc(dof, statistic)))  # chi-square survival function


def ridit_scores(reference: npt.ArrayLike) -> FloatArray:
    """Each bin's mid-rank in the reference distribution: F(bin start) + p(bin) / 2, in [0, 1].

    On quantile bins these are close to the bin indices scaled to [0, 1]; where the reference piles up
    in a bin (ties) the bin's rank sits at the middle of its share.
    """
    p = proportions(reference)
    return np.cumsum(p) - p / 2


def standardized_scores(reference: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Per-bin location and scale scores with mean 0 and variance 1 under the reference.

    location = (rank - mean rank) / sd; scale = (location**2 - 1) / sd of location**2 (zero when the
    reference has a single bin, where neither can move). A sample in bin j scores location[j]: a live
    mean of location scores m over n samples has z = m * sqrt(n) under no drift, which sees a mean shift;
    scale scores see a spread change.
    """
    p = proportions(reference)
    location = _standardize(ridit_scores(reference), p)
    scale = _standardize(location**2, p)
    return location, scale


def _standardize(values: FloatArray, p: FloatArray) -> FloatArray:
    mean = float(np.sum(p * values))
    centred = values - mean
    sd = float(np.sqrt(np.sum(p * centred**2)))
    if sd < 1e-12:
        return np.zeros_like(values)
    return centred / sd


def location_z(reference: npt.ArrayLike, live: npt.ArrayLike) -> float:
    """Standardized mean bin rank of the live counts: about N(0, 1) under no drift, sign = direction.

    A 0.5 sigma mean shift of a Gaussian feature on 10 quantile bins moves the mean location score by
    about 0.46, so a window of 50 samples gives z near 3.3.
    """
    ref, cur = _pair(reference, live)
    n = cur.sum()
    if n == 0:
        return 0.0
    location, _ = standardized_scores(ref)
    return float(np.dot(cur, location) / np.sqrt(n))


def scale_z(reference: npt.ArrayLike, live: npt.ArrayLike) -> float:
    """Standardized mean squared rank deviation: about N(0, 1) under no drift; > 0 when the spread grows."""
    ref, cur = _pair(reference, live)
    n = cur.sum()
    if n == 0:
        return 0.0
    _, scale = standardized_scores(ref)
    return float(np.dot(cur, scale) / np.sqrt(n))
