"""Issue 12, end to end: a real agent and hub, an app feeding shifted digits through `EdgeClient`, an
open drift alert at the hub naming the input, `/metrics` showing it, and a report plot written."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from conftest import wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_end_to_end import start_agent
from typer.testing import CliRunner

from cloud_hub.api_client import AdminClient
from cloud_hub.cli import app as hub_cli
from cloud_hub.server import Hub, operator_token
from edge_agent import EdgeClient


def feed(client: EdgeClient, x: np.ndarray, rows: int = 10) -> None:
    """Calls of ``rows`` samples at about 100 calls a second: every call's tensors are summarised."""
    for start in range(0, len(x), rows):
        client.infer("digits-cnn", {"input": x[start : start + rows]})
        time.sleep(0.01)


def metric(url: str, token: str, name: str) -> list[tuple[dict[str, str], float]]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    return [(s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def test_shifted_digits_raise_a_drift_alert_shown_in_metrics_and_a_report_plot(
    hub: Hub, tmp_path: Path, keys: tuple[Path, Path], digits_artifact: dict[str, Any]
) -> None:
    warnings = digits_artifact["report"].warnings
    assert any(w.startswith(f"drift reference from {len(digits_artifact['x'])} validation samples") for w in warnings)
    assert hub.admin is not None
    url, token = f"http://127.0.0.1:{hub.admin.port}", operator_token(hub.config.state_dir)
    admin = AdminClient(url, token)
    admin.add_artifact(digits_artifact["path"])
    agent, thread = start_agent(tmp_path / "device", hub, keys)
    try:
        wait_for("device online", lambda: [d for d in admin.request("GET", "/v1/devices") if d["profile"]])
        admin.deploy("digits-cnn", "1.0.0", "device:dev-1")
        x = digits_artifact["x"]
        rng = np.random.default_rng(3)
        shifted = np.clip(np.rot90(x, k=1, axes=(2, 3)) + rng.normal(0, 0.15, x.shape), 0, 1).astype(np.float32)
        with EdgeClient(tmp_path / "device") as client:
            wait_for("model active", lambda: any(m.active_version == "1.0.0" for m in client.models()))
            feed(client, x[:400])  # what the reference saw: quiet
            wait_for("clean telemetry at the hub", lambda: agent.spool.pending_calls() == 0)
            hub.drift.run_once()
            assert not [a for a in hub.alerts.list() if a.kind == "drift"]
            feed(client, shifted[:400])

        def drift_alert() -> Any:
            hub.drift.run_once()
            return next((a for a in hub.alerts.list("open") if a.kind == "drift"), None)

        alert = wait_for("a drift alert", drift_alert, 30)
        assert alert.key == "drift:digits-cnn@1.0.0:all" and alert.scope == "all"
        assert any(name.startswith("input/") for name in alert.details["drifting"])  # it names the input
        scores = metric(f"{url}/metrics", token, "edgefed_hub_drift_score")
        drifting = {labels["feature"] for labels, value in scores if value >= 1.0}
        assert drifting & set(alert.details["drifting"])
        alerts = metric(f"{url}/metrics", token, "edgefed_hub_alerts")
        assert any(labels["kind"] == "drift" and labels["state"] == "open" and value == 1 for labels, value in alerts)
        plot = tmp_path / "drift.png"
        result = CliRunner().invoke(hub_cli, ["drift", "report", "digits-cnn", "--hub", url, "--token", token,
                                              "--plot", str(plot)])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "digits-cnn@1.0.0 (all)" in result.output and plot.read_bytes()[:4] == b"\x89PNG"
    finally:
        agent.stop_event.set()
        thread.join(timeout=10)
