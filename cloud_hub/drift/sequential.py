"""A sequential drift detector over windows of live counts, with a bounded false-alarm rate.

Per feature, four CUSUMs of log-likelihood ratios (mean up/down, spread up/down, see `likelihood`); across
features, one combined CUSUM of the features' mixture ratios: their mean by default (valid however the
features depend on each other), or their product with `independent_features=True` (a small shift in every
feature then adds up, but correlated features raise false alarms). The alarm threshold h is the same for
all m = 4F + 1 CUSUMs and comes from an analytic bound, not a fit: each CUSUM of true likelihood ratios
raises on average at most exp(-h) false alarms per window (Ville's inequality applied to every restart),
so with h = ln(m * 100_000 / (rate * window_calls)) the whole family raises at most `rate` false alarms
per 100,000 samples in windows of `window_calls` samples.
See docs/drift.md for the derivation, the assumptions and the measured rates and delays.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud_hub.drift.likelihood import ALTERNATIVES, FeatureModel, mixture_log_ratio
from cloud_hub.drift.scores import g_test, js_distance, psi, standardized_scores

FloatArray = npt.NDArray[np.float64]
STATE_VERSION = 1


@dataclass(frozen=True)
class FeatureScore:
    """One feature's scores for one window (the omnibus scores are on this window's counts alone)."""

    samples: int
    psi: float
    js: float
    g_statistic: float
    dof: int
    p_value: float
    location_z: float  # standardized mean bin rank, about N(0, 1) under no drift
    scale_z: float  # standardized squared rank deviation, > 0 when the spread grows
    cusum: float  # the largest of the feature's four CUSUMs, compared with the threshold
    direction: str  # which of ALTERNATIVES that CUSUM watches

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "psi": self.psi,
            "js": self.js,
            "g_statistic": self.g_statistic,
            "dof": self.dof,
            "p_value": self.p_value,
            "location_z": self.location_z,
            "scale_z": self.scale_z,
            "cusum": self.cusum,
            "direction": self.direction,
        }


@dataclass(frozen=True)
class WindowResult:
    alarm: bool
    drifting: tuple[str, ...]  # feature names driving the alarm, worst first (empty without alarm)
    scores: dict[str, FeatureScore]  # features present in the window
    combined: float  # the combined statistic's CUSUM
    threshold: float  # h, shared by every CUSUM

    def to_dict(self) -> dict[str, Any]:
        return {
            "alarm": self.alarm,
            "drifting": list(self.drifting),
            "combined": self.combined,
            "threshold": self.threshold,
            "scores": {name: score.to_dict() for name, score in self.scores.items()},
        }


def alarm_threshold(n_features: int, *, false_alarms_per_100k: float, window_calls: int,
                    alternatives: int = len(ALTERNATIVES)) -> float:  # fmt: skip
    """h such that 4 * n_features + 1 CUSUMs raise at most the given rate per 100,000 samples."""
    if false_alarms_per_100k <= 0 or window_calls <= 0 or n_features <= 0:
        raise ValueError("false_alarms_per_100k, window_calls and the number of features must be positive")
    cusums = alternatives * n_features + 1
    alarms_per_window = false_alarms_per_100k * window_calls / 100_000
    return max(math.log(cusums / alarms_per_window), 0.0)


def reference_digest(reference: Mapping[str, npt.ArrayLike]) -> str:
    """sha256 over the feature names and reference counts, in name order."""
    digest = hashlib.sha256()
    for name in sorted(reference):
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(np.asarray(reference[name], dtype=np.float64).tobytes())
    return digest.hexdigest()


class SequentialDetector:
    """CUSUMs per feature plus a combined CUSUM across features, with one calibrated threshold.

    `update` feeds one window (feature name -> live counts on the reference bins); features missing from
    it are skipped (their CUSUMs keep their value). `shift` is the tilt theta of the alternatives (about the
    mean shift, in reference standard deviations, the detector is tuned for); `weight` the prior weight of
    "this feature moved" in the combined statistic. After an alarm the statistics keep accumulating until
    `reset` (the caller decides, e.g. when an alert is resolved).
    """

    def __init__(
        self,
        reference: Mapping[str, np.ndarray],
        *,
        false_alarms_per_100k: float = 1.0,
        window_calls: int = 50,
        seed: int = 0,
        shift: float = 0.5,
        weight: float = 0.5,
        independent_features: bool = False,
        watch: tuple[str, ...] = ALTERNATIVES,
    ) -> None:
        """``watch``: the alternatives to raise on (e.g. only ``mean_up`` for error rates and latency,
        where only a rise matters); the others are never evidence, and the threshold counts only these."""
        if not reference:
            raise ValueError("the reference has no features")
        if not 0 < weight < 1 or shift <= 0:
            raise ValueError("weight must be in (0, 1) and shift positive")
        self.names: tuple[str, ...] = tuple(reference)
        self.reference = {name: np.asarray(reference[name], dtype=np.int64) for name in self.names}
        self.models = {name: FeatureModel.from_counts(self.reference[name], theta=shift) for name in self.names}
        self.rank_scores = {name: standardized_scores(self.reference[name]) for name in self.names}
        self.false_alarms_per_100k = float(false_alarms_per_100k)
        self.window_calls = int(window_calls)
        self.seed = int(seed)  # default seed of `calibration.simulate_clean` for this detector
        self.shift = float(shift)
        self.weight = float(weight)
        self.independent_features = bool(independent_features)
        if not watch or not set(watch) <= set(ALTERNATIVES):
            raise ValueError(f"watch: choose among {', '.join(ALTERNATIVES)}")
        self.watch = tuple(a for a in ALTERNATIVES if a in watch)
        self._unwatched = [i for i, a in enumerate(ALTERNATIVES) if a not in self.watch]
        self.threshold = alarm_threshold(len(self.names), false_alarms_per_100k=false_alarms_per_100k,
                                         window_calls=window_calls, alternatives=len(self.watch))  # fmt: skip
        self.digest = reference_digest(self.reference)
        self.reset()

    def reset(self) -> None:
        """Forget all evidence: every CUSUM back to zero."""
        self.cusums = np.zeros((len(self.names), len(ALTERNATIVES)))
        self.combined = 0.0
        self.contributions = np.zeros(len(self.names))
        self.windows = 0
        self.samples = 0

    def update(self, window: Mapping[str, np.ndarray]) -> WindowResult:
        """Add one window of live counts; returns this window's scores and whether the detector alarms."""
        present = [i for i, name in enumerate(self.names) if name in window]
        counts = {self.names[i]: np.asarray(window[self.names[i]], dtype=np.int64) for i in present}
        ratios = np.zeros((len(self.names), len(ALTERNATIVES)))
        for i in present:
            ratios[i] = self.models[self.names[i]].log_ratios(counts[self.names[i]])
        ratios[:, self._unwatched] = -np.inf  # never evidence: the CUSUM stays at 0, the mixture ignores it
        self.step(ratios, present)
        self.windows += 1
        self.samples += max((int(c.sum()) for c in counts.values()), default=0)
        scores = {self.names[i]: self._score(i, counts[self.names[i]]) for i in present}
        drifting = self._drifting()
        return WindowResult(bool(drifting), drifting, scores, self.combined, self.threshold)

    def step(self, ratios: FloatArray, present: list[int]) -> None:
        """The CUSUM recursions for one window's log-likelihood ratios (features x alternatives)."""
        if not present:
            return
        self.cusums[present] = np.maximum(self.cusums[present] + ratios[present], 0.0)
        mixture = mixture_log_ratio(ratios[present], weight=self.weight)
        if self.independent_features:  # product of the features' ratios: a ratio only if they are independent
            evidence = float(mixture.sum())
        else:  # their mean: a likelihood ratio however the features depend on each other
            evidence = float(np.logaddexp.reduce(mixture) - np.log(len(present)))
        combined = self.combined + evidence
        if combined <= 0.0:
            self.combined, self.contributions[:] = 0.0, 0.0
        else:
            self.combined = combined
            self.contributions[present] += mixture

    def alarming(self) -> bool:
        return self.combined >= self.threshold or bool(np.any(self.cusums >= self.threshold))

    def _drifting(self) -> tuple[str, ...]:
        worst = self.cusums.max(axis=1)
        evidence = worst.copy()
        candidates = worst >= self.threshold
        if self.combined >= self.threshold:
            candidates |= self.contributions > 0
            evidence = np.maximum(evidence, self.contributions)
        order = sorted(np.flatnonzero(candidates), key=lambda i: -evidence[i])
        return tuple(self.names[i] for i in order)

    def _score(self, index: int, counts: np.ndarray) -> FeatureScore:
        reference = self.reference[self.names[index]]
        fit = g_test(reference, counts)
        column = int(np.argmax(self.cusums[index]))
        location, scale = self.rank_scores[self.names[index]]
        root_n = max(float(np.sqrt(counts.sum())), 1.0)
        return FeatureScore(
            samples=int(counts.sum()),
            psi=psi(reference, counts),
            js=js_distance(reference, counts),
            g_statistic=fit.statistic,
            dof=fit.dof,
            p_value=fit.p_value,
            location_z=float(counts @ location) / root_n,
            scale_z=float(counts @ scale) / root_n,
            cusum=float(self.cusums[index, column]),
            direction=ALTERNATIVES[column],
        )

    def state(self) -> dict[str, Any]:
        """JSON-able state: parameters, the reference's digest and every CUSUM."""
        return {
            "version": STATE_VERSION,
            "reference_sha256": self.digest,
            "false_alarms_per_100k": self.false_alarms_per_100k,
            "window_calls": self.window_calls,
            "seed": self.seed,
            "shift": self.shift,
            "weight": self.weight,
            "independent_features": self.independent_features,
            "watch": list(self.watch),
            "windows": self.windows,
            "samples": self.samples,
            "combined": self.combined,
            "cusums": {name: self.cusums[i].tolist() for i, name in enumerate(self.names)},
            "contributions": {name: float(self.contributions[i]) for i, name in enumerate(self.names)},
        }

    @classmethod
    def from_state(cls, reference: Mapping[str, np.ndarray], state: Mapping[str, Any]) -> SequentialDetector:
        """Rebuild a detector saved by `state`; the reference must be the one it was built on."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported detector state version {state.get('version')!r}")
        detector = cls(
            reference,
            false_alarms_per_100k=float(state["false_alarms_per_100k"]),
            window_calls=int(state["window_calls"]),
            seed=int(state["seed"]),
            shift=float(state["shift"]),
            weight=float(state["weight"]),
            independent_features=bool(state["independent_features"]),
            watch=tuple(state.get("watch", ALTERNATIVES)),
        )
        if detector.digest != state["reference_sha256"]:
            raise ValueError("the detector state was saved for a different reference; start a new detector")
        detector.windows, detector.samples = int(state["windows"]), int(state["samples"])
        detector.combined = float(state["combined"])
        for i, name in enumerate(detector.names):
            detector.cusums[i] = np.asarray(state["cusums"][name], dtype=np.float64)
            detector.contributions[i] = float(state["contributions"][name])
        return detector
