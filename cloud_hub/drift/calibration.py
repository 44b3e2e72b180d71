"""Simulation under the reference: how often a detector raises false alarms on clean streams.

The threshold itself comes from an analytic bound (`sequential.alarm_threshold`); this module measures
the rate the bound gives, by feeding a copy of the detector multinomial windows drawn from each feature's
reference proportions (features independent, seeded). Used by the tests and by docs/drift.md's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cloud_hub.drift.sequential import SequentialDetector


@dataclass(frozen=True)
class CleanRun:
    windows: int
    samples: int
    alarms: int
    threshold: float

    @property
    def false_alarms_per_100k(self) -> float:
        return self.alarms * 100_000 / self.samples


def simulate_clean(
    detector: SequentialDetector,
    *,
    windows: int,
    window_samples: int | None = None,
    seed: int | None = None,
    threshold: float | None = None,
) -> CleanRun:
    """Run `windows` clean windows through a fresh copy of `detector`, resetting after each alarm.

    `threshold` overrides the detector's h (to show what a lower one would do). The raw reference
    proportions are drawn from, not the smoothed ones the detector tests against.
    """
    probe = SequentialDetector(
        detector.reference,
        false_alarms_per_100k=detector.false_alarms_per_100k,
        window_calls=detector.window_calls,
        seed=detector.seed,
        shift=detector.shift,
        weight=detector.weight,
        independent_features=detector.independent_features,
    )
    if threshold is not None:
        probe.threshold = threshold
    n = window_samples or detector.window_calls
    rng = np.random.default_rng(detector.seed if seed is None else seed)
    ratios = np.stack([_clean_ratios(probe, name, rng, windows, n) for name in probe.names], axis=1)
    present = list(range(len(probe.names)))
    alarms = 0
    for w in range(windows):
        probe.step(ratios[w], present)
        if probe.alarming():
            alarms += 1
            probe.reset()
    return CleanRun(windows, windows * n, alarms, probe.threshold)


def _clean_ratios(
    detector: SequentialDetector, name: str, rng: np.random.Generator, windows: int, n: int
) -> np.ndarray:
    reference = detector.reference[name].astype(np.float64)
    counts = rng.multinomial(n, reference / reference.sum(), size=windows)
    return detector.models[name].log_ratios(counts)
