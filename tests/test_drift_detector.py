"""The hub's drift scores and sequential detector (cloud_hub/drift) on seeded synthetic streams."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cloud_hub.drift import (
    SequentialDetector,
    alarm_threshold,
    g_test,
    js_distance,
    location_z,
    psi,
    scale_z,
    simulate_clean,
)

FEATURES = 10
BINS = 10
WINDOW = 50


def _bin(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
    return np.bincount(index, minlength=len(edges) - 1).astype(np.int64)


class GaussianStream:
    """10 independent N(0, 1) features, quantile edges and reference counts from 20,000 samples."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        data = self.rng.standard_normal((20_000, FEATURES))
        self.edges = [np.quantile(data[:, j], np.linspace(0, 1, BINS + 1)) for j in range(FEATURES)]
        self.reference = {f"x/{j}": _bin(data[:, j], self.edges[j]) for j in range(FEATURES)}

    def window(
        self, *, mean: np.ndarray | float = 0.0, sd: np.ndarray | float = 1.0, n: int = WINDOW
    ) -> dict[str, np.ndarray]:
        values = self.rng.standard_normal((n, FEATURES)) * sd + mean
        return {f"x/{j}": _bin(values[:, j], self.edges[j]) for j in range(FEATURES)}

    def delay(
        self,
        detector: SequentialDetector,
        *,
        mean: np.ndarray | float = 0.0,
        sd: np.ndarray | float = 1.0,
        limit: int = 40,
    ) -> tuple[int, tuple[str, ...]]:
        """Windows until the first alarm (limit + 1 if none) and the features it names."""
        detector.reset()
        for index in range(1, limit + 1):
            result = detector.update(self.window(mean=mean, sd=sd))
            if result.alarm:
                return index, result.drifting
        return limit + 1, ()


@pytest.fixture(scope="module")
def stream() -> GaussianStream:
    return GaussianStream(seed=7)


# -- scores on a tiny example, computed by hand ------------------------------------------------------


def test_psi_matches_hand_computation() -> None:
    # p = .1 .2 .3 .4, q = .2 .2 .2 .4: (.1) ln 2 + (-.1) ln(2/3) = .1 ln 3
    assert psi([10, 20, 30, 40], [20, 20, 20, 40]) == pytest.approx(0.1 * math.log(3), rel=1e-12)
    assert psi([10, 20, 30, 40], [1, 2, 3, 4]) == pytest.approx(0.0, abs=1e-15)


def test_psi_floors_empty_bins_at_epsilon() -> None:
    expected = (0.5 - 1e-4) * math.log(0.5 / 1e-4) + (0.5 - 1.0) * math.log(0.5)
    assert psi([0, 10], [5, 5]) == pytest.approx(expected, rel=1e-12)


def test_js_distance_matches_hand_computation() -> None:
    p, q = [0.1, 0.2, 0.3, 0.4], [0.2, 0.2, 0.2, 0.4]
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    kl_pm = sum(a * math.log2(a / c) for a, c in zip(p, m, strict=True))
    kl_qm = sum(b * math.log2(b / c) for b, c in zip(q, m, strict=True))
    assert js_distance([10, 20, 30, 40], [20, 20, 20, 40]) == pytest.approx(math.sqrt((kl_pm + kl_qm) / 2))
    assert js_distance([1, 0], [0, 1]) == pytest.approx(1.0)
    assert js_distance([3, 5], [6, 10]) == pytest.approx(0.0, abs=1e-7)


def test_g_test_matches_hand_computation() -> None:
    # expected 10 20 30 40 for 100 live counts 20 20 20 40: G = 2 (20 ln 2 + 20 ln 2/3) = 40 ln 4/3
    result = g_test([10, 20, 30, 40], [20, 20, 20, 40])
    statistic = 40 * math.log(4 / 3)
    # chi-square survival function with 3 degrees of freedom, in closed form
    p_value = math.erfc(math.sqrt(statistic / 2)) + math.sqrt(2 * statistic / math.pi) * math.exp(-statistic / 2)
    assert result.statistic == pytest.approx(statistic, rel=1e-12)
    assert result.dof == 3
    assert result.p_value == pytest.approx(p_value, rel=1e-9)


def test_g_test_rejects_counts_where_the_reference_has_none() -> None:
    assert g_test([0, 10, 10], [0, 5, 5]).dof == 1
    rejected = g_test([0, 10, 10], [1, 5, 5])
    assert rejected.p_value == 0.0 and math.isinf(rejected.statistic)


def test_location_and_scale_z_on_uniform_bins() -> None:
    # ridit scores .125 .375 .625 .875 standardize to (-3, -1, 1, 3) / sqrt(5)
    assert location_z([25, 25, 25, 25], [0, 0, 0, 4]) == pytest.approx(4 * 3 / math.sqrt(5) / 2)
    assert location_z([25, 25, 25, 25], [4, 0, 0, 4]) == pytest.approx(0.0, abs=1e-12)
    # squared locations 9/5 and 1/5: mean 1, sd 4/5; (9/5 - 1) / (4/5) = 1 for each outer-bin sample
    assert scale_z([25, 25, 25, 25], [4, 0, 0, 4]) == pytest.approx(8 * 1.0 / math.sqrt(8))
    assert scale_z([25, 25, 25, 25], [0, 4, 4, 0]) == pytest.approx(-math.sqrt(8))


def test_mean_shift_of_half_sigma_is_seen_in_50_samples(stream: GaussianStream) -> None:
    reference = stream.reference["x/0"]
    shifted = [location_z(reference, stream.window(mean=0.5)["x/0"]) for _ in range(200)]
    clean = [location_z(reference, stream.window()["x/0"]) for _ in range(200)]
    assert abs(np.mean(clean)) < 0.2 and 0.85 < np.std(clean) < 1.15
    assert np.mean(shifted) > 3.0  # 0.5 sigma * sqrt(50) = 3.5 minus what 10 bins lose


# -- the sequential detector -------------------------------------------------------------------------


def test_threshold_follows_the_bound() -> None:
    # 41 CUSUMs, 1 false alarm per 100,000 samples in windows of 50 -> h = ln(41 / 0.0005)
    assert alarm_threshold(10, false_alarms_per_100k=1.0, window_calls=50) == pytest.approx(math.log(82_000))
    assert alarm_threshold(10, false_alarms_per_100k=10.0, window_calls=50) < math.log(82_000)


def test_clean_streams_stay_quiet_and_half_the_threshold_would_not(stream: GaussianStream) -> None:
    detector = SequentialDetector(stream.reference)
    windows = 10_000  # 500,000 samples: the stated rate allows 5 alarms
    calibrated = simulate_clean(detector, windows=windows, seed=11)
    assert calibrated.samples == 500_000
    assert calibrated.false_alarms_per_100k <= 1.0
    too_low = simulate_clean(detector, windows=windows, seed=11, threshold=detector.threshold / 2)
    assert too_low.false_alarms_per_100k > 4.0  # a threshold 2x too low breaks the rate several times over


def test_clean_gaussian_windows_through_update_raise_no_alarm(stream: GaussianStream) -> None:
    detector = SequentialDetector(stream.reference)
    alarms = 0
    for index in range(2_000):  # 100,000 samples, windows of 20 to 80
        if detector.update(stream.window(n=20 + (index * 7) % 61)).alarm:
            alarms += 1
            detector.reset()
    assert alarms <= 1


def test_half_sigma_shift_in_all_features_alarms_in_the_first_windows(stream: GaussianStream) -> None:
    detector = SequentialDetector(stream.reference)
    delays = [stream.delay(detector, mean=0.5)[0] for _ in range(20)]
    assert max(delays) <= 3 and float(np.median(delays)) <= 2
    pooled = SequentialDetector(stream.reference, independent_features=True)
    assert max(stream.delay(pooled, mean=0.5)[0] for _ in range(20)) <= 2


def _correlated_alarms(independent_features: bool, *, rho: float = 0.9, windows: int = 1_000) -> int:
    rng = np.random.default_rng(3)

    def draw(n: int) -> np.ndarray:
        common = rng.standard_normal((n, 1))
        values: np.ndarray = np.sqrt(rho) * common + np.sqrt(1 - rho) * rng.standard_normal((n, FEATURES))
        return values

    data = draw(20_000)
    edges = [np.quantile(data[:, j], np.linspace(0, 1, BINS + 1)) for j in range(FEATURES)]
    detector = SequentialDetector(
        {f"x/{j}": _bin(data[:, j], edges[j]) for j in range(FEATURES)}, independent_features=independent_features
    )
    alarms = 0
    for _ in range(windows):
        values = draw(WINDOW)
        if detector.update({f"x/{j}": _bin(values[:, j], edges[j]) for j in range(FEATURES)}).alarm:
            alarms += 1
            detector.reset()
    return alarms


def test_correlated_features_stay_quiet_by_default_and_break_the_product() -> None:
    # 50,000 clean samples of 10 features with correlation 0.9: the default combination (a mean of the
    # features' likelihood ratios) holds its rate; the product, valid only for independent features, does not
    assert _correlated_alarms(False) == 0
    assert _correlated_alarms(True) >= 4


def test_half_sigma_shift_in_one_feature_is_named_first(stream: GaussianStream) -> None:
    detector = SequentialDetector(stream.reference)
    mean = np.zeros(FEATURES)
    mean[3] = 0.5
    runs = [stream.delay(detector, mean=mean) for _ in range(20)]
    delays = [delay for delay, _ in runs]
    assert all(drifting and drifting[0] == "x/3" for _, drifting in runs)
    assert max(delays) <= 10 and float(np.median(delays)) <= 4


def test_negative_shift_is_reported_as_mean_down(stream: GaussianStream) -> None:
    detector = SequentialDetector(stream.reference)
    mean = np.zeros(FEATURES)
    mean[5] = -0.5
    for _ in range(40):
        result = detector.update(stream.window(mean=mean))
        if result.alarm:
            break
    assert result.alarm and result.drifting[0] == "x/5"
    assert result.scores["x/5"].direction == "mean_down"
    assert result.scores["x/5"].location_z < 0


def test_variance_change_is_detected(stream: GaussianStream) -> None:
    detector = SequentialDetector(stream.reference)
    delays = [stream.delay(detector, sd=1.5)[0] for _ in range(10)]
    assert max(delays) <= 3
    sd = np.ones(FEATURES)
    sd[8] = 1.5
    single = [stream.delay(detector, sd=sd) for _ in range(10)]
    assert all(drifting and drifting[0] == "x/8" for _, drifting in single)
    assert float(np.median([delay for delay, _ in single])) <= 10


def test_features_missing_from_a_window_are_skipped(stream: GaussianStream) -> None:
    detector = SequentialDetector(stream.reference)
    window = stream.window(mean=1.0)
    partial = {name: counts for name, counts in window.items() if name != "x/2"}
    result = detector.update(partial)
    assert "x/2" not in result.scores and set(result.scores) == set(partial)
    assert detector.state()["cusums"]["x/2"] == [0.0, 0.0, 0.0, 0.0]
    assert result.scores["x/0"].samples == WINDOW


def test_state_round_trips_through_json(stream: GaussianStream) -> None:
    detector = SequentialDetector(stream.reference, false_alarms_per_100k=5.0, independent_features=True)
    mean = np.zeros(FEATURES)
    mean[1] = 0.3
    for _ in range(3):
        detector.update(stream.window(mean=mean))
    restored = SequentialDetector.from_state(stream.reference, json.loads(json.dumps(detector.state())))
    assert restored.state() == detector.state()
    assert restored.threshold == detector.threshold
    window = stream.window(mean=mean)
    assert restored.update(window).to_dict() == detector.update(window).to_dict()


def test_state_for_another_reference_is_refused(stream: GaussianStream) -> None:
    state = SequentialDetector(stream.reference).state()
    other = {name: counts + 1 for name, counts in stream.reference.items()}
    with pytest.raises(ValueError, match="different reference"):
        SequentialDetector.from_state(other, state)


def test_reset_forgets_the_evidence(stream: GaussianStream) -> None:
    detector = SequentialDetector(stream.reference)
    assert detector.update(stream.window(mean=1.0)).alarm
    detector.reset()
    assert detector.combined == 0.0 and not detector.alarming()
