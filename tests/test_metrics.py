"""Prometheus metrics: the hub's /metrics over real HTTP against a real registry, and the agent's own
metrics port, scraped over real HTTP."""

from __future__ import annotations

import math
import shutil
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MosquittoProcess, free_port, make_artifact, wait_for
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from cloud_hub.metrics import LATENCY_PERIOD_S, quantile_ms
from edge_agent.protocol.messages import LATENCY_EDGES_MS, TelemetryBatch, TelemetryWindow

Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def scrape(url: str, token: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name][frozenset(labels.items())]


def hist(**bins: int) -> tuple[int, ...]:
    """Counts on LATENCY_EDGES_MS + overflow: ``b4=50`` puts 50 calls in bin 4."""
    return tuple(bins.get(f"b{i}", 0) for i in range(len(LATENCY_EDGES_MS) + 1))


def operator_token(hub: Any) -> str:
    return str((hub.config.state_dir / "operator.token").read_text().strip())


def test_quantiles_are_interpolated_within_the_histogram_bins() -> None:
    counts = hist(b4=50, b5=40, b13=10)  # 0.5-1 ms, 1-2.5 ms, over 1 s
    assert quantile_ms(counts, 0.5) == pytest.approx(1.0)
    assert quantile_ms(counts, 0.25) == pytest.approx(0.75)
    assert quantile_ms(counts, 0.9) == pytest.approx(2.5)
    assert quantile_ms(counts, 0.99) == LATENCY_EDGES_MS[-1]  # in the overflow: the top edge, a lower bound
    assert quantile_ms(hist(b0=4), 0.5) == pytest.approx(0.025)  # the first bin starts at 0
    assert math.isnan(quantile_ms(hist(), 0.5))


def feed(hub: Any) -> None:
    registry = hub.registry
    registry.upsert_device("dev-1", profile="x86-64-generic", status="online")
    registry.upsert_device("dev-2", profile="x86-64-generic", status="offline")
    registry.upsert_device("dev-3", profile="x86-64-generic", status="enrolled")
    local = TelemetryWindow("m", "1.0.0", "local", 0.0, 1.0, 100, 2, 500.0, hist(b4=50, b5=40, b13=10), 7)
    cloud = TelemetryWindow("m", "1.0.0", "cloud", 0.0, 1.0, 10, 1, 200.0, hist(b9=10))
    batch = TelemetryBatch("dev-1", 1, (local, cloud), dropped=3, epoch="e1")
    assert registry.add_telemetry(batch)
    assert not registry.add_telemetry(batch)  # resent: stored once
    assert registry.add_telemetry(TelemetryBatch("dev-2", 1, (local,), epoch="e2"))
    old = TelemetryBatch("dev-2", 2, (TelemetryWindow("m", "1.0.0", "local", 0.0, 1.0, 5, 0, 5.0, hist(b0=5)),),
                         dropped=4, epoch="e2")  # fmt: skip
    assert registry.add_telemetry(old)
    with registry.db.conn:  # received before the recent period: counted in totals, not in recent latency
        registry.db.execute("UPDATE telemetry SET received = received - ? WHERE device_id = 'dev-2' AND seq = 2",
                            [2 * LATENCY_PERIOD_S])  # fmt: skip
    registry.add_usage({("dev-1", "m"): 5, ("dev-1", "n"): 2, ("dev-2", "m"): 1})
    hub.alerts.raise_alert("drift:a", "drift", "warning", "m", "1.0.0", "all", "pixel_3 drifted", {})
    hub.alerts.raise_alert("drift:b", "drift", "warning", "m", "1.0.0", "group:lab", "pixel_4 drifted", {})
    latency, _ = hub.alerts.raise_alert("latency:a", "latency", "critical", "m", "1.0.0", "all", "slow", {})
    hub.alerts.ack(latency.id, "ana")
    resolved, _ = hub.alerts.raise_alert("drift:c", "drift", "info", "m", "1.0.0", "all", "gone", {})
    hub.alerts.resolve(resolved.id, "ana")


def test_hub_metrics_read_the_registry_and_need_the_operator_token(hub: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    feed(hub)
    monkeypatch.setattr(hub, "drift_scores", lambda: [("m", "1.0.0", "group:lab", "input/pixel_4", 0.31),
                                                      ("m", "1.0.0", "all", "output/class", 0.02)])  # fmt: skip
    url = f"http://127.0.0.1:{hub.admin.port}/metrics"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url)
    assert refused.value.code == 401
    samples = scrape(url, operator_token(hub))
    again = scrape(url, operator_token(hub))
    assert {k: v for k, v in again.items() if k.startswith("edgefed_")} == {
        k: v for k, v in samples.items() if k.startswith("edgefed_")
    }  # a second scrape counts nothing twice
    assert value(samples, "edgefed_hub_devices_known") == 3 and value(samples, "edgefed_hub_devices_online") == 1
    local, cloud = {"model": "m", "version": "1.0.0", "route": "local"}, {"model": "m", "version": "1.0.0",
                                                                          "route": "cloud"}  # fmt: skip
    assert value(samples, "edgefed_hub_calls_total", **local) == 205  # dev-1's batch once, dev-2's two
    assert value(samples, "edgefed_hub_calls_total", **cloud) == 10
    assert value(samples, "edgefed_hub_call_errors_total", **local) == 4
    assert value(samples, "edgefed_hub_budget_breaches_total", **local) == 14
    assert value(samples, "edgefed_hub_call_latency_ms_count", **local) == 205
    assert value(samples, "edgefed_hub_call_latency_ms_bucket", **local, le="0.05") == 5
    assert value(samples, "edgefed_hub_call_latency_ms_bucket", **local, le="2.5") == 185
    assert value(samples, "edgefed_hub_call_latency_ms_sum", **local) == 1005
    recent = "edgefed_hub_call_latency_recent_ms"
    assert value(samples, recent, **local, quantile="0.5") == pytest.approx(1.0)  # the old batch is left out
    assert value(samples, recent, **local, quantile="0.9") == pytest.approx(2.5)
    assert value(samples, recent, **local, quantile="0.99") == 1000.0
    assert value(samples, recent, **cloud, quantile="0.5") == pytest.approx(37.5)
    assert value(samples, "edgefed_hub_spool_dropped_total", device="dev-1") == 3
    assert value(samples, "edgefed_hub_spool_dropped_total", device="dev-2") == 4
    assert value(samples, "edgefed_hub_cloud_calls_total", device="dev-1") == 7
    assert value(samples, "edgefed_hub_cloud_calls_total", device="dev-2") == 1
    assert samples["edgefed_hub_alerts"] == {
        frozenset({"kind": "drift", "severity": "warning", "state": "open"}.items()): 2,
        frozenset({"kind": "latency", "severity": "critical", "state": "acknowledged"}.items()): 1,
    }
    drift = "edgefed_hub_drift_score"
    assert value(samples, drift, model="m", version="1.0.0", scope="group:lab", feature="input/pixel_4") == 0.31
    assert len(samples[drift]) == 2
    assert "edgefed_hub_alert_webhook_failures_total" not in samples  # no webhook configured
    assert all(v == 0 for v in samples["edgefed_hub_metric_series_omitted"].values())
    assert "process_cpu_seconds_total" in samples


@pytest.fixture
def public_hub(mosquitto: MosquittoProcess, tmp_path: Path, keys: tuple[Path, Path]) -> Iterator[Any]:
    """A hub with --public-metrics and a webhook nobody listens on."""
    from cloud_hub.server import Hub, HubConfig

    state = tmp_path / "hub"
    (state / "trust").mkdir(parents=True)
    shutil.copy(keys[1], state / "trust")
    config = HubConfig(state, broker=mosquitto.url, grpc_port=0, admin_port=0, public_metrics=True,
                       alert_webhook=f"http://127.0.0.1:{free_port()}/down")  # fmt: skip
    running = Hub(config)
    assert running.webhook is not None
    running.webhook.attempts, running.webhook.backoff_s = 2, 0.05
    running.start()
    yield running
    running.stop()


def test_public_metrics_and_webhook_failures(public_hub: Any) -> None:
    public_hub.alerts.raise_alert("drift:a", "drift", "warning", "m", "1.0.0", "all", "pixel_3 drifted", {})
    wait_for("the failed delivery", lambda: public_hub.webhook.failures["unreachable"] == 1, 15)
    samples = scrape(f"http://127.0.0.1:{public_hub.admin.port}/metrics")  # no token needed
    assert value(samples, "edgefed_hub_alert_webhook_failures_total", reason="unreachable") == 1
    assert value(samples, "edgefed_hub_alert_webhook_failures_total", reason="queue_full") == 0
    assert value(samples, "edgefed_hub_alert_webhook_deliveries_total") == 0
    assert value(samples, "edgefed_hub_devices_known") == 0
    with pytest.raises(urllib.error.HTTPError) as refused:  # the rest of the API still needs the token
        urllib.request.urlopen(f"http://127.0.0.1:{public_hub.admin.port}/v1/alerts")
    assert refused.value.code == 401


def test_agent_metrics_over_http(mosquitto: MosquittoProcess, device: tuple[Path, Any, Any],
                                 keys: tuple[Path, Path], tmp_path: Path) -> None:  # fmt: skip
    from device_profiles import get_profile
    from edge_agent.agent import Agent
    from edge_agent.config import AgentConfig
    from edge_agent.metrics import start_metrics_server

    state, store, trust = device
    AgentConfig(device_id="dev-1", profile="x86-64-generic", broker=mosquitto.url).save(state)
    store.install(make_artifact(tmp_path / "gemm", keys[0]), trust, get_profile("x86-64-generic"), activate=True)
    agent = Agent(state, AgentConfig.load(state))
    agent.spool.append([], dropped=2)
    server, _ = start_metrics_server(agent, 0)
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    try:
        samples = scrape(url)
        assert value(samples, "edgefed_agent_broker_connected") == 0
        assert value(samples, "edgefed_agent_calls_dropped_total") == 2
        assert value(samples, "edgefed_agent_calls_spooled_total") == 0
        assert value(samples, "edgefed_agent_budget_breaches_total") == 0
        assert value(samples, "edgefed_agent_spool_resets_total") == 0
        assert value(samples, "edgefed_agent_installs_total") == 0
        assert value(samples, "edgefed_agent_calls_pending") == 0
        active = samples["edgefed_agent_active_model"]
        assert [dict(k)["model"] for k in active] == ["gemm"] and [dict(k)["version"] for k in active] == ["1.0.0"]
        assert dict(next(iter(samples["edgefed_agent_info"])))["device"] == "dev-1"
        runner = threading.Thread(target=agent.run, daemon=True)
        runner.start()
        wait_for("the broker link", lambda: value(scrape(url), "edgefed_agent_broker_connected") == 1)
        agent.stop_event.set()
        runner.join(10)
    finally:
        server.shutdown()
        server.server_close()


def test_agent_metrics_port_in_use_is_named(device: tuple[Path, Any, Any]) -> None:
    from edge_agent.cli import app as agent_cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(agent_cli, ["run", "--state-dir", str(device[0]), "--metrics-port", str(port)])
    assert result.exit_code == 2
    assert f"--metrics-port {port} on --metrics-host 127.0.0.1" in result.output and "pick a free port" in result.output
