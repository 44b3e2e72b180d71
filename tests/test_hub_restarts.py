"""Deployments converge across restarts (issue 11): the registry is the source of truth for desired
states, republished whenever the hub (re)connects to a broker; the hub restarts at once on its ports;
a deployment that cannot finish ends as failed (timed out), never pending forever."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
from conftest import MosquittoProcess, free_port, make_artifact, wait_for

from cloud_hub.api_client import AdminClient
from cloud_hub.server import Hub, HubConfig, operator_token
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
from edge_agent.mqtt import MqttConnection
from edge_agent.protocol.topics import Topics


class RunningAgent:
    def __init__(self, state: Path, broker: str, keys: tuple[Path, Path]) -> None:
        (state / "trust").mkdir(parents=True, exist_ok=True)
        shutil.copy(keys[1], state / "trust")
        self.config = AgentConfig(device_id="dev-1", profile="x86-64-generic", broker=broker)
        self.config.save(state)
        self.agent = Agent(state, self.config)
        self.thread = threading.Thread(target=self.agent.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.agent.stop_event.set()
        self.thread.join(timeout=10)


def start_hub(state: Path, keys: tuple[Path, Path], **config: object) -> Hub:
    (state / "trust").mkdir(parents=True, exist_ok=True)
    shutil.copy(keys[1], state / "trust")
    # these agents connect without credentials (what they test is not confinement: test_mqtt_security.py)
    hub = Hub(HubConfig(state, **{"allow_anonymous": True, **config}))  # type: ignore[arg-type]
    hub.start()
    return hub


def admin(hub: Hub) -> AdminClient:
    assert hub.admin is not None
    return AdminClient(f"http://127.0.0.1:{hub.admin.port}", operator_token(hub.config.state_dir))


def state_of(hub: Hub, deployment_id: str) -> str:
    return str(admin(hub).request("GET", f"/v1/deployments/{deployment_id}")["states"]["dev-1"]["state"])


def known(hub: Hub) -> bool:
    return any(d["device_id"] == "dev-1" and d["profile"] for d in admin(hub).request("GET", "/v1/devices"))


@pytest.fixture
def ports() -> dict[str, int]:
    return {"broker_port": free_port(), "grpc_port": free_port(), "admin_port": free_port()}


def test_the_hub_restarts_at_once_and_a_deploy_made_before_reaches_the_device(
    tmp_path: Path, keys: tuple[Path, Path], ports: dict[str, int]
) -> None:
    """Embedded broker: the retained desired state dies with the hub. Restarted at once on the same
    ports (connections of the first run still in TIME_WAIT), the hub publishes it again."""
    hub = start_hub(tmp_path / "hub", keys, **ports)
    broker = f"mqtt://127.0.0.1:{ports['broker_port']}"
    agent = RunningAgent(tmp_path / "device", broker, keys)
    try:
        wait_for("the hub to know the device", lambda: known(hub))
        agent.stop()
        admin(hub).add_artifact(make_artifact(tmp_path / "gemm", keys[0]))
        deployment = admin(hub).deploy("gemm", "1.0.0", "device:dev-1")["deployment_id"]
        bystander = MqttConnection(broker)  # connected while the broker goes: its socket lingers in TIME_WAIT
        bystander.start()
        hub.stop()
        hub = start_hub(tmp_path / "hub", keys, **ports)  # the same ports, at once
        bystander.stop()
        agent = RunningAgent(tmp_path / "device", broker, keys)
        wait_for("the deployment to converge", lambda: state_of(hub, deployment) == "active", 30)
    finally:
        agent.stop()
        hub.stop()


def test_a_hub_on_postgresql_keeps_its_registry_there_across_a_restart(
    tmp_path: Path, keys: tuple[Path, Path], ports: dict[str, int], postgres_url: str
) -> None:
    """`serve --registry postgresql://...`: devices, artifacts, deployments and the audit log live in
    PostgreSQL (none in STATE/registry.db; the hub's other stores too: test_shared_stores.py); a restarted
    hub finds them there and the deployment converges."""
    import sqlite3

    import psycopg

    hub = start_hub(tmp_path / "hub", keys, registry=postgres_url, **ports)
    broker = f"mqtt://127.0.0.1:{ports['broker_port']}"
    agent = RunningAgent(tmp_path / "device", broker, keys)
    try:
        wait_for("the hub to know the device", lambda: known(hub))
        agent.stop()
        admin(hub).add_artifact(make_artifact(tmp_path / "gemm", keys[0]))
        deployment = admin(hub).deploy("gemm", "1.0.0", "device:dev-1")["deployment_id"]
        audit = admin(hub).request("GET", "/v1/audit")  # read from PostgreSQL, where the hub wrote it
        assert {"deploy", "POST /v1/deployments"} <= {entry["action"] for entry in audit}
        hub.stop()
        hub.registry.close()
        hub = start_hub(tmp_path / "hub", keys, registry=postgres_url, **ports)
        agent = RunningAgent(tmp_path / "device", broker, keys)
        wait_for("the deployment to converge", lambda: state_of(hub, deployment) == "active", 30)
    finally:
        agent.stop()
        hub.stop()
        hub.registry.close()
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT device_id FROM device_models").fetchall() == [("dev-1",)]
        assert conn.execute("SELECT COUNT(*) FROM deployments").fetchone() == (1,)
    with sqlite3.connect(tmp_path / "hub" / "registry.db") as local:
        tables = {row[0] for row in local.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert not tables & {"devices", "artifacts", "deployments", "telemetry"}


def test_a_broker_that_lost_its_retained_messages_gets_the_desired_state_again(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    """Broker and agent down together: a new broker on the same port holds no retained desired state;
    the hub sends it again when it reconnects, and the agent converges."""
    (tmp_path / "broker-1").mkdir()
    mosquitto = MosquittoProcess(tmp_path / "broker-1")
    hub = start_hub(tmp_path / "hub", keys, broker=mosquitto.url, grpc_port=0, admin_port=0)
    agent = RunningAgent(tmp_path / "device", mosquitto.url, keys)
    replacement = None
    try:
        wait_for("the hub to know the device", lambda: known(hub))
        agent.stop()
        admin(hub).add_artifact(make_artifact(tmp_path / "gemm", keys[0]))
        deployment = admin(hub).deploy("gemm", "1.0.0", "device:dev-1")["deployment_id"]
        mosquitto.process.kill()
        mosquitto.process.wait()
        (tmp_path / "broker-2").mkdir()
        replacement = MosquittoProcess(tmp_path / "broker-2", port=mosquitto.port)  # no retained messages
        agent = RunningAgent(tmp_path / "device", mosquitto.url, keys)
        began = time.monotonic()
        wait_for("the deployment to converge", lambda: state_of(hub, deployment) == "active", 45)
        assert time.monotonic() - began < 45
    finally:
        agent.stop()
        hub.stop()
        if replacement is not None:
            replacement.stop()


def test_a_deployment_that_cannot_finish_times_out(tmp_path: Path, keys: tuple[Path, Path],
                                                   ports: dict[str, int]) -> None:  # fmt: skip
    hub = start_hub(tmp_path / "hub", keys, deploy_timeout_s=1.0, **ports)
    agent = RunningAgent(tmp_path / "device", f"mqtt://127.0.0.1:{ports['broker_port']}", keys)
    try:
        wait_for("the hub to know the device", lambda: known(hub))
        agent.stop()  # offline for good
        admin(hub).add_artifact(make_artifact(tmp_path / "gemm", keys[0]))
        deployment = admin(hub).deploy("gemm", "1.0.0", "device:dev-1")["deployment_id"]
        assert state_of(hub, deployment) == "pending"
        wait_for("the deployment to time out", lambda: state_of(hub, deployment) == "failed", 10)
        error = admin(hub).request("GET", f"/v1/deployments/{deployment}")["states"]["dev-1"]["error"]
        assert error.startswith("timed out: gemm@1.0.0 not reported active within 1 s")
    finally:
        hub.stop()


def test_a_device_whose_desired_state_is_gone_asks_the_hub_for_it(
    hub: Hub, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    """The retained desired state and the device's broker session are both lost while the hub stays
    connected (so it republishes nothing by itself), and the device still reports the model: only its
    own ask (``desired/get``) brings the new version."""
    agent = RunningAgent(tmp_path / "device", hub.broker_url, keys)
    try:
        wait_for("the hub to know the device", lambda: known(hub))
        for version, release in (("1.0.0", 1), ("2.0.0", 2)):
            admin(hub).add_artifact(make_artifact(tmp_path / version, keys[0], version=version, release=release))
        first = admin(hub).deploy("gemm", "1.0.0", "device:dev-1")["deployment_id"]
        wait_for("1.0.0 active", lambda: state_of(hub, first) == "active")
        agent.stop()
        second = admin(hub).deploy("gemm", "2.0.0", "device:dev-1")["deployment_id"]
        eraser = MqttConnection(hub.broker_url, client_id="edgefed-dev-1", clean_session=True)  # drops the session
        eraser.start()
        eraser.publish(Topics().desired("dev-1"), b"", retain=True).wait_for_publish(5)  # and the retained copy
        eraser.stop()
        agent = RunningAgent(tmp_path / "device", hub.broker_url, keys)
        wait_for("2.0.0 active", lambda: state_of(hub, second) == "active", 30)
    finally:
        agent.stop()
