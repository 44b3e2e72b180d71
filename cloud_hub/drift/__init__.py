"""Drift detection on the hub: scores of live counts against an artifact's reference, and a sequential
detector with a bounded false-alarm rate (docs/drift.md)."""

from cloud_hub.drift.calibration import CleanRun, simulate_clean
from cloud_hub.drift.scores import GTest, g_test, js_distance, location_z, psi, scale_z
from cloud_hub.drift.sequential import FeatureScore, SequentialDetector, WindowResult, alarm_threshold

__all__ = [
    "CleanRun",
    "FeatureScore",
    "GTest",
    "SequentialDetector",
    "WindowResult",
    "alarm_threshold",
    "g_test",
    "js_distance",
    "location_z",
    "psi",
    "scale_z",
    "simulate_clean",
]
