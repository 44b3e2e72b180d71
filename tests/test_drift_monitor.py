"""The hub's drift job on real parts: a hub on Mosquitto, a signed artifact with a reference, telemetry
batches stored as devices send them, SQLite state that survives a restart, alerts, reports and plots."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from common import artifact, gemm_onnx
from test_hub_restarts import admin
from typer.testing import CliRunner

from cloud_hub.cli import app as hub_cli
from cloud_hub.drift.monitor import DriftMonitor
from cloud_hub.drift.operations import FEATURES as OPERATION_FEATURES
from cloud_hub.drift.plot import write_plot
from cloud_hub.server import Hub
from edge_agent.protocol.messages import LATENCY_EDGES_MS, TelemetryBatch, TelemetryWindow, TensorHistogram
from edge_agent.protocol.sketch import Sketch

RNG = np.random.default_rng(7)
FEATURES = 10


@pytest.fixture
def sensor(tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    """A 10-feature Gemm classifier whose reference comes from 4,000 standard normal samples."""
    samples = RNG.standard_normal((4000, FEATURES)).astype(np.float32)
    model = partial(gemm_onnx, features=FEATURES, classes=3)
    return artifact(tmp_path, "sensor", model, ["batch", FEATURES], ["batch", 3], keys[0], reference=samples)


class Device:
    """Sends the batches an agent would: its sampled calls' feature counts on the reference."""

    def __init__(self, hub: Hub, device_id: str, sketch: Sketch, groups: list[str],
                 tags: dict[str, str] | None = None) -> None:  # fmt: skip
        self.hub, self.device_id, self.sketch, self.seq = hub, device_id, sketch, 0
        hub.registry.upsert_device(device_id, profile="x86-64-generic", groups=groups, tags=tags or {})

    def send(self, x: np.ndarray) -> None:
        self.seq += 1
        counts = self.sketch.count({"input": x})
        histograms = tuple(TensorHistogram("sensor", "1.0.0", f.name, tuple(f.edges.tolist()),
                                           tuple(counts[f.name].tolist()), len(x), len(x))
                           for f in self.sketch.features if f.name in counts)  # fmt: skip
        self.hub.registry.add_telemetry(TelemetryBatch(self.device_id, self.seq, histograms=histograms, epoch="e"))


def clean(n: int) -> np.ndarray:
    return RNG.standard_normal((n, FEATURES)).astype(np.float32)


def shifted(n: int, feature: int = 3, by: float = 1.0) -> np.ndarray:
    x = clean(n)
    x[:, feature] += by
    return x


def drift_alerts(hub: Hub) -> list[Any]:
    return [a for a in hub.alerts.list() if a.kind == "drift"]


def test_a_shift_in_one_feature_raises_one_alert_per_scope_naming_it(hub: Hub, sensor: Path) -> None:
    admin(hub).add_artifact(sensor)
    sketch = Sketch.load(sensor)
    assert sketch is not None
    lab = Device(hub, "dev-lab", sketch, ["lab"], {"site": "north"})
    other = Device(hub, "dev-other", sketch, [])
    for _ in range(40):  # 40 windows of 200 clean samples in scope "all", 20 in group:lab
        lab.send(clean(100))
        other.send(clean(100))
    assert hub.drift.run_once() == 80
    assert not drift_alerts(hub)  # a clean stream stays quiet
    for _ in range(6):
        lab.send(shifted(100))
    hub.drift.run_once()
    alerts = {a.scope: a for a in drift_alerts(hub)}
    assert set(alerts) == {"all", "group:lab", "tag:site=north"} and all(a.state == "open" for a in alerts.values())
    assert alerts["group:lab"].key == "drift:sensor@1.0.0:group:lab"
    assert alerts["group:lab"].details["drifting"][0] == "input/3"
    assert "input/3" in alerts["group:lab"].summary
    for _ in range(20):  # still drifting: the same alerts, seen again, not new ones
        lab.send(shifted(100))
    hub.drift.run_once()
    again = {a.scope: a for a in drift_alerts(hub)}
    assert {a.id for a in again.values()} == {a.id for a in alerts.values()} and again["group:lab"].count > 1
    scores = {(scope, feature): score for _, _, scope, feature, score in hub.drift.scores()}
    assert scores[("group:lab", "input/3")] > scores[("group:lab", "input/0")]


def test_the_drift_job_keeps_its_open_windows_and_detectors_across_a_restart(hub: Hub, sensor: Path) -> None:
    admin(hub).add_artifact(sensor)
    sketch = Sketch.load(sensor)
    assert sketch is not None
    device = Device(hub, "dev-1", sketch, [])
    device.send(shifted(150))
    hub.drift.run_once()  # 150 of 200 samples: the window stays open
    assert not hub.drift.store.windows("sensor", "1.0.0")
    restarted = DriftMonitor(hub.registry, hub.store, hub.alerts, str(hub.config.state_dir / "registry.db"))
    assert restarted.run_once() == 0  # nothing processed twice
    device.send(shifted(50))
    restarted.run_once()
    (window,) = restarted.store.windows("sensor", "1.0.0")
    assert window.samples == 200 and sum(window.features["input/3"]["counts"]) == 200


def test_a_report_lists_features_by_score_with_live_counts_and_draws_them(
    hub: Hub, sensor: Path, tmp_path: Path
) -> None:
    admin(hub).add_artifact(sensor)
    sketch = Sketch.load(sensor)
    assert sketch is not None
    device = Device(hub, "dev-1", sketch, ["lab"])
    for _ in range(10):
        device.send(shifted(100, feature=5, by=0.7))
    hub.drift.run_once()
    report = hub.drift.report("sensor", None, "group:lab")
    assert report["version"] == "1.0.0" and len(report["windows"]) == 5
    top = report["features"][0]
    assert top["name"] == "input/5" and sum(top["live"]) == 1000 and top["psi"] > 0.1
    assert len(top["edges"]) == len(top["reference"]) + 1
    for name in ("drift.png", "drift.html"):
        write_plot(report, tmp_path / name)
    assert (tmp_path / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "drift.html").read_text()
    assert "data:image/png;base64," in page and "input/5" in page


def test_backtest_finds_a_shift_and_stays_quiet_on_clean_data(sensor: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "clean.npz", input=clean(20_000))
    stream = clean(6000)
    stream[3000:] += 0.5  # every feature from sample 3000 on
    np.savez(tmp_path / "shift.npz", input=stream)
    runner = CliRunner()
    quiet = runner.invoke(hub_cli, ["drift", "backtest", str(sensor), str(tmp_path / "clean.npz"), "--json"])
    assert quiet.exit_code == 0, quiet.output
    result = json.loads(quiet.output)
    assert result["alarm_index"] is None and result["windows"] == 400 and len(result["scores"]) == 400
    found = json.loads(runner.invoke(hub_cli, ["drift", "backtest", str(sensor), str(tmp_path / "shift.npz"),
                                               "--window-calls", "100", "--json"]).output)  # fmt: skip
    assert 3000 <= found["alarm_index"] < 3400 and found["windows"] == 60
    bad = runner.invoke(hub_cli, ["drift", "backtest", str(sensor), str(tmp_path / "missing.npz")])
    assert bad.exit_code == 2 and "cannot read it as .npz" in bad.output
    np.savez(tmp_path / "wrong.npz", x=clean(10))
    wrong = runner.invoke(hub_cli, ["drift", "backtest", str(sensor), str(tmp_path / "wrong.npz")])
    assert wrong.exit_code == 2 and "no array named input; the model's inputs are input" in wrong.output


def window(route: str, calls: int, errors: int, slow: int = 0) -> TelemetryWindow:
    """A telemetry window of ``calls`` at 0.3 ms, ``slow`` of them at 30 ms and over the budget."""
    hist = [0] * (len(LATENCY_EDGES_MS) + 1)
    hist[LATENCY_EDGES_MS.index(0.5)] += calls - slow
    hist[LATENCY_EDGES_MS.index(50.0)] += slow
    return TelemetryWindow("sensor", "1.0.0", route, 0.0, 1.0, calls, errors, 0.3 * calls, tuple(hist), slow)


def test_errors_fallbacks_and_slow_calls_raise_an_operations_alert_against_the_stream_s_baseline(
    hub: Hub, sensor: Path
) -> None:
    hub.registry.upsert_device("dev-1", profile="x86-64-generic")
    hub.registry.add_telemetry(TelemetryBatch("dev-1", 99, windows=(window("local", 90, 1),), epoch="x"))
    hub.drift.run_once()  # a model the registry does not know yet gets no stream
    assert not hub.drift.store.streams()
    admin(hub).add_artifact(sensor)
    batches = [(window("local", 90, 1), window("cloud", 10, 0))] * 50  # baseline 2,000 calls, 1% errors; then quiet
    for seq, windows in enumerate(batches, 1):
        hub.registry.add_telemetry(TelemetryBatch("dev-1", seq, windows=windows, epoch="e"))
    hub.drift.run_once()
    assert not hub.alerts.list()
    worse = (window("local", 50, 10, slow=20), window("cloud", 50, 0))  # more errors, fallbacks, slow calls
    for seq in range(51, 56):
        hub.registry.add_telemetry(TelemetryBatch("dev-1", seq, windows=worse, epoch="e"))
    hub.drift.run_once()
    (alert,) = hub.alerts.list()
    assert alert.kind == "operations" and alert.key == "operations:sensor@1.0.0:all"
    assert alert.details["drifting"] and set(alert.details["drifting"]) <= set(OPERATION_FEATURES)
    report = hub.drift.report("sensor", "1.0.0", "operations/all")
    features = {f["name"]: f for f in report["features"]}
    assert set(features) == set(OPERATION_FEATURES)
    assert features["ops/errors"]["reference"] == [1980, 20]  # its first 2,000 calls
    ok, errors = features["ops/errors"]["live"]
    assert errors / (ok + errors) > 0.02  # the live error rate, above the baseline's 1%
