"""The whole loop on real parts: compiled digits CNN → hub (registry, MQTT, OIP gRPC, admin API) →
agent over a real broker (Mosquitto on a free port, and the embedded amqtt broker) → SDK local and
cloud routes → telemetry stored by the hub."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import MosquittoProcess, free_port, wait_for

from cloud_hub.api_client import AdminClient
from cloud_hub.broker import EmbeddedBroker
from cloud_hub.errors import BrokerError, HubError
from cloud_hub.server import Hub, HubConfig, operator_token
from edge_agent import EdgeClient
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
from edge_agent.errors import ModelNotDeployed


@pytest.fixture(params=["mosquitto", "embedded"])
def hub(request: pytest.FixtureRequest, tmp_path: Path, keys: tuple[Path, Path]) -> Iterator[Hub]:
    external = None
    if request.param == "mosquitto":
        external = MosquittoProcess(tmp_path)
    state = tmp_path / "hub"
    (state / "trust").mkdir(parents=True)
    shutil.copy(keys[1], state / "trust")
    config = HubConfig(
        state, broker=external.url if external else None, broker_port=free_port(), grpc_port=0, admin_port=0
    )
    hub = Hub(config)
    hub.start()
    yield hub
    hub.stop()
    if external is not None:
        external.stop()


def start_agent(state: Path, hub: Hub, keys: tuple[Path, Path]) -> tuple[Agent, threading.Thread]:
    (state / "trust").mkdir(parents=True, exist_ok=True)
    shutil.copy(keys[1], state / "trust")
    config = AgentConfig(
        device_id="dev-1",
        profile="x86-64-generic",
        broker=hub.broker_url,
        cloud=f"grpc://127.0.0.1:{hub.grpc_port}",
        telemetry_interval_s=0.2,
    )
    config.save(state)
    agent = Agent(state, config)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    return agent, thread


def test_deploy_infer_locally_and_in_the_cloud_and_collect_telemetry(
    hub: Hub, tmp_path: Path, keys: tuple[Path, Path], digits_artifact: dict[str, Any]
) -> None:
    assert hub.admin is not None
    admin = AdminClient(f"http://127.0.0.1:{hub.admin.port}", operator_token(hub.config.state_dir))
    added = admin.add_artifact(digits_artifact["path"])
    assert added["new"] and added["profile"] == "x86-64-generic"

    device_state = tmp_path / "device"
    agent, thread = start_agent(device_state, hub, keys)
    try:
        wait_for(
            "device online",
            lambda: [d for d in admin.request("GET", "/v1/devices") if d["status"] == "online" and d["profile"]],
        )
        x, y = digits_artifact["x"], digits_artifact["y"]
        with EdgeClient(device_state) as client:
            cloud = client.infer("digits-cnn", {"input": x[:8]})
            assert cloud.route == "cloud" and cloud.version == "1.0.0"

            deployment = admin.deploy("digits-cnn", "1.0.0", "device:dev-1")
            assert deployment["devices"] == {"dev-1": added["artifact_id"]}
            wait_for("model active", lambda: any(m.active_version == "1.0.0" for m in client.models()))
            local = client.infer("digits-cnn", {"input": x})
            assert local.route == "local" and local.version == "1.0.0"
            assert np.mean(local.outputs["output"].argmax(1) == y) > 0.9
            # both routes answer with the same model version: the same predictions
            assert np.array_equal(cloud.outputs["output"].argmax(1), local.outputs["output"].argmax(1)[:8])
            for i in range(20):
                client.infer("digits-cnn", {"input": x[i : i + 1]})

        def local_calls() -> int:
            rows = admin.request("GET", "/v1/telemetry?device=dev-1")
            return sum(w["count"] for r in rows for w in r["windows"] if w["route"] == "local")

        wait_for("telemetry at the hub", lambda: local_calls() == 21)
        reported = admin.request("GET", "/v1/devices")[0]["reported"]
        assert reported["models"][0]["state"] == "active"
        assert agent.spool.pending_calls() == 0
    finally:
        agent.stop_event.set()
        thread.join(timeout=10)
    wait_for("device offline", lambda: admin.request("GET", "/v1/devices")[0]["status"] == "offline")


def test_operator_errors_are_clear(hub: Hub, tmp_path: Path) -> None:
    assert hub.admin is not None
    admin = AdminClient(f"http://127.0.0.1:{hub.admin.port}", operator_token(hub.config.state_dir))
    with pytest.raises(HubError, match=r"404.*no artifact"):
        admin.deploy("nope", "1.0.0", "device:dev-1")
    with pytest.raises(HubError, match="401"):
        AdminClient(f"http://127.0.0.1:{hub.admin.port}", "wrong").request("GET", "/v1/status")
    with pytest.raises(HubError, match="not an artifact directory"):
        admin.add_artifact(tmp_path)


def test_sdk_without_local_model_or_cloud_says_so(tmp_path: Path) -> None:
    with (
        EdgeClient(tmp_path, telemetry=False) as client,
        pytest.raises(ModelNotDeployed, match="no cloud endpoint"),
    ):
        client.infer("digits-cnn", {"input": np.zeros((1, 1, 8, 8), np.float32)})


def test_embedded_broker_port_taken_says_how_to_fix() -> None:
    port = free_port()
    first = EmbeddedBroker(port=port)
    first.start()
    try:
        with pytest.raises(BrokerError, match=f"port {port}.*--broker-port.*--broker mqtt://"):
            EmbeddedBroker(port=port).start()
    finally:
        first.stop()
