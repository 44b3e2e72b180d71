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
        state,
        broker=external.url if external else None,
        broker_port=free_port(),
        grpc_port=0,
        admin_port=0,
        allow_anonymous=True,  # its agent connects without credentials (confinement: test_mqtt_security.py)
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


@pytest.fixture(scope="module")
def x86_and_pi(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path],
               digits_artifact: dict[str, Any]) -> list[Path]:  # fmt: skip
    """The digits CNN compiled in one call for an x86 profile and a Raspberry Pi profile (LiteRT)."""
    from conftest import ROOT

    from model_compiler import CompileOptions, compile_model

    work = digits_artifact["path"].parents[1]
    options = CompileOptions(name="digits-pi", version="1.0.0", key_path=keys[0])
    reports = compile_model(f"{ROOT / 'examples/quickstart/digits.py'}:trained", ["x86-64-generic", "raspberry-pi-4"],
                            (np.load(work / "calib.npz")["x"], None), (digits_artifact["x"], digits_artifact["y"]),
                            tmp_path_factory.mktemp("x86-and-pi"), options)  # fmt: skip
    assert not [r.error for r in reports if r.error]
    return [Path(r.artifact) for r in reports]


@pytest.mark.parametrize("hub", ["embedded"], indirect=True)
def test_one_version_on_x86_and_a_pi_shares_release_interface_and_result_keys(
    hub: Hub, tmp_path: Path, keys: tuple[Path, Path], x86_and_pi: list[Path], digits_artifact: dict[str, Any]
) -> None:
    """Issue 10's end-to-end check: one release, identical interfaces, and the cloud answering from the
    x86 artifact with the same output keys as the local route on a Pi-profile device."""
    from device_profiles import get_profile
    from edge_agent.protocol.artifact import read_manifest
    from edge_agent.protocol.signing import TrustStore
    from edge_agent.store import ModelStore

    assert hub.admin is not None
    admin = AdminClient(f"http://127.0.0.1:{hub.admin.port}", operator_token(hub.config.state_dir))
    added = [admin.add_artifact(path) for path in x86_and_pi]
    assert [a["profile"] for a in added] == ["x86-64-generic", "raspberry-pi-4"]
    assert len({a["release"] for a in added}) == 1
    shown = admin.request("GET", "/v1/models/digits-pi/1.0.0")
    servable = {a["profile"]: (a["runtime"], a["servable"]) for a in shown["artifacts"]}
    assert servable == {"x86-64-generic": ("onnxruntime", True), "raspberry-pi-4": ("tflite", False)}
    trust = TrustStore.from_dir(keys[1].parent)
    x86, pi = (read_manifest(path, trust) for path in x86_and_pi)
    assert x86.interface == pi.interface and x86.interface.inputs[0].shape[0] == "batch"

    state = tmp_path / "pi-device"
    (state / "trust").mkdir(parents=True)
    shutil.copy(keys[1], state / "trust")
    AgentConfig(device_id="pi-1", profile="raspberry-pi-4", cloud=f"grpc://127.0.0.1:{hub.grpc_port}").save(state)
    ModelStore(state / "models").install(x86_and_pi[1], trust, get_profile("raspberry-pi-4"), activate=True)
    x = digits_artifact["x"][:6]
    with EdgeClient(state, telemetry=False) as client:
        local = client.infer("digits-pi", {"input": x})
        client.policy = "cloud_only"
        cloud = client.infer("digits-pi", {"input": x})
    assert (local.route, cloud.route) == ("local", "cloud") and local.version == cloud.version == "1.0.0"
    assert list(local.outputs) == list(cloud.outputs) == ["output"]
    assert np.array_equal(local.outputs["output"].argmax(1), cloud.outputs["output"].argmax(1))
    import onnxruntime as ort

    session = ort.InferenceSession(str(x86_and_pi[0] / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.allclose(cloud.outputs["output"], session.run(None, {"input": x})[0], atol=1e-5)  # the x86 artifact
