"""Deployment faults on a real Mosquitto: an agent killed mid-download resumes with only the missing
chunks, a device that was offline catches up, the broker killed mid-transfer, a forged chunk on the
wire, a chunk rotten on the hub's disk; and how chunk rounds serve late and re-asking devices."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import astuple
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from common import sized_artifact
from conftest import MosquittoProcess, wait_for
from paho.mqtt.enums import CallbackAPIVersion

from cloud_hub.server import Hub, HubConfig
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
from edge_agent.protocol.manifest import manifest_from_wire
from edge_agent.protocol.messages import Chunk, FetchRequest, from_wire, to_wire
from edge_agent.store import ModelStore

CHUNK = 4096


def big_artifact(work: Path, key: Path) -> Path:
    """A Gemm artifact with a 256 KiB side file, in 4 KiB chunks: 65 chunks to move."""
    return sized_artifact(work, "gemm", 256 * 1024, key, CHUNK)


@pytest.fixture
def hub(mosquitto: MosquittoProcess, tmp_path: Path, keys: tuple[Path, Path]) -> Iterator[Hub]:
    state = tmp_path / "hub"
    (state / "trust").mkdir(parents=True)
    shutil.copy(keys[1], state / "trust")
    hub = Hub(HubConfig(state, broker=mosquitto.url, grpc_port=0, admin_port=0, max_chunk_rate=60))
    hub.start()
    yield hub
    hub.stop()


def register(hub: Hub, artifact: Path) -> str:
    manifest = hub.store.add(artifact)
    hub.registry.add_artifact(manifest, hub.store.signature(manifest.artifact_id))
    return manifest.artifact_id


def device_state(tmp_path: Path, keys: tuple[Path, Path], broker: str, device_id: str = "dev-1") -> Path:
    state = tmp_path / ("device" if device_id == "dev-1" else device_id)
    (state / "trust").mkdir(parents=True)
    shutil.copy(keys[1], state / "trust")
    AgentConfig(device_id=device_id, profile="x86-64-generic", broker=broker).save(state)
    return state


def agent_process(state: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "from edge_agent.cli import main; main()", "run", "--state-dir",
                             str(state)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def online(hub: Hub) -> bool:
    """A device is online and has reported its profile (status and reported state are two messages)."""
    return any(d["status"] == "online" and d["profile"] for d in hub.registry.devices())


def test_agent_killed_mid_download_fetches_only_missing_chunks(
    hub: Hub, mosquitto: MosquittoProcess, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    artifact_id = register(hub, big_artifact(tmp_path, keys[0]))
    requests: list[FetchRequest] = []
    spy = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="spy")
    spy.on_message = lambda c, u, m: requests.append(from_wire(FetchRequest, m.payload))
    spy.connect("127.0.0.1", mosquitto.port)
    spy.subscribe(hub.topics.fetch("dev-1"), qos=1)
    spy.loop_start()
    state = device_state(tmp_path, keys, mosquitto.url)
    chunks = state / "downloads" / artifact_id / "chunks"
    agent = agent_process(state)
    try:
        wait_for("device online", lambda: online(hub))
        assert hub.control is not None
        hub.control.deploy("gemm", "1.0.0", "device:dev-1")

        def stored() -> int:  # complete chunks only (an atomic write in flight is a dot-file)
            return len([p for p in chunks.iterdir() if not p.name.startswith(".")]) if chunks.is_dir() else 0

        wait_for("a third of the chunks", lambda: stored() >= 22)
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
        kept = {tuple(map(int, p.name.split("-"))) for p in chunks.iterdir() if not p.name.startswith(".")}
        assert 22 <= len(kept) < 60 and not ModelStore(state / "models").active("gemm")
        agent = agent_process(state)
        wait_for("model active after restart", lambda: ModelStore(state / "models").active("gemm"), timeout_s=60)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=20)
        spy.loop_stop()
    assert requests[0].chunks == ()  # the first fetch asked for everything
    resumed = requests[1]
    manifest = manifest_from_wire(hub.registry.artifact(artifact_id)["manifest"])
    everything = {(f, c) for f, entry in enumerate(manifest.files) for c in range(len(entry.chunks))}
    assert {tuple(c) for c in resumed.chunks} == everything - kept  # only what was not on disk
    assert not (state / "downloads" / artifact_id).exists()  # cleaned up after install


def test_offline_device_catches_up(
    hub: Hub, mosquitto: MosquittoProcess, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    register(hub, big_artifact(tmp_path, keys[0]))
    state = device_state(tmp_path, keys, mosquitto.url)
    agent = Agent(state, AgentConfig.load(state))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    wait_for("device online", lambda: online(hub))
    agent.stop_event.set()
    thread.join(timeout=10)
    wait_for("device offline", lambda: not online(hub))
    assert hub.control is not None
    hub.control.deploy("gemm", "1.0.0", "device:dev-1")  # the device is offline: desired state is retained
    agent = Agent(state, AgentConfig.load(state))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        wait_for("caught up", lambda: ModelStore(state / "models").active("gemm"), timeout_s=60)
        wait_for("reported active", lambda: (hub.registry.device("dev-1")["reported"] or {}).get("models", [{}])[0]
                 .get("state") == "active")  # fmt: skip
    finally:
        agent.stop_event.set()
        thread.join(timeout=10)


def test_a_device_that_asks_mid_round_gets_the_rest_of_that_round(
    hub: Hub, mosquitto: MosquittoProcess, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    register(hub, big_artifact(tmp_path, keys[0]))  # 65 chunks at 60/s: a round of about 1.1 s
    states = [device_state(tmp_path, keys, mosquitto.url, device) for device in ("dev-1", "dev-2")]
    agents = [Agent(state, AgentConfig.load(state)) for state in states]
    threads = [threading.Thread(target=agent.run, daemon=True) for agent in agents]
    for thread in threads:
        thread.start()
    control = hub.control
    assert control is not None
    try:
        wait_for("both online", lambda: sum(d["status"] == "online" and bool(d["profile"])
                                            for d in hub.registry.devices()) == 2)  # fmt: skip
        control.deploy("gemm", "1.0.0", "device:dev-1")
        wait_for("round under way", lambda: control.chunks_sent >= 20)
        sent_before = control.chunks_sent
        control.deploy("gemm", "1.0.0", "device:dev-2")
        for state in states:
            wait_for("active", lambda: ModelStore(state / "models").active("gemm"), timeout_s=60)  # noqa: B023
        time.sleep(1.5)  # longer than a whole round: whatever the hub had queued is out
    finally:
        for agent, thread in zip(agents, threads, strict=True):
            agent.stop_event.set()
            thread.join(timeout=10)
    # dev-2 asked for all 65 chunks: the rest of the round reached it, the next round re-sent only what
    # had gone out before its request arrived (sent_before, plus the few published while it asked)
    assert control.chunks_sent - 65 <= sent_before + 10 < 65


def test_chunks_few_devices_lack_go_to_each_on_its_own_topic(
    hub: Hub, mosquitto: MosquittoProcess, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    artifact_id = register(hub, big_artifact(tmp_path, keys[0]))
    devices = ("dev-a", "dev-b", "dev-c", "dev-d")
    received: dict[str, set[tuple[str, int, int]]] = {d: set() for d in devices}
    clients, subscribed = {}, threading.Semaphore(0)
    for device in devices:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device)
        client.on_message = lambda c, u, m, d=device: received[d].add(  # type: ignore[misc]
            ("own" if "/devices/" in m.topic else "shared", *astuple(Chunk.from_wire(m.payload))[:2]))
        client.on_subscribe = lambda *args: subscribed.release()
        client.connect("127.0.0.1", mosquitto.port)
        client.subscribe([(hub.topics.chunks(artifact_id), 1), (hub.topics.device_chunks(device), 1)])
        client.loop_start()
        clients[device] = client
    try:
        for _ in devices:
            assert subscribed.acquire(timeout=10)
        for device, own_chunk in (("dev-a", 0), ("dev-b", 1), ("dev-c", 2)):  # one round: each lacks (1, 5) too
            request = FetchRequest(artifact_id, ((1, own_chunk), (1, 5)))
            clients[device].publish(hub.topics.fetch(device), to_wire(request), qos=1)
        wait_for("chunks delivered", lambda: sum(map(len, received.values())) == 7)
        time.sleep(0.5)  # and nothing more
    finally:
        for client in clients.values():
            client.loop_stop()
    assert received == {
        "dev-a": {("own", 1, 0), ("shared", 1, 5)},
        "dev-b": {("own", 1, 1), ("shared", 1, 5)},
        "dev-c": {("own", 1, 2), ("shared", 1, 5)},
        "dev-d": {("shared", 1, 5)},  # what all three lacked went once to everyone; the rest to its asker only
    }


def test_a_resuming_agent_gets_what_it_lacks_on_its_own_topic(
    hub: Hub, mosquitto: MosquittoProcess, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    artifact_id = register(hub, big_artifact(tmp_path, keys[0]))
    state = device_state(tmp_path, keys, mosquitto.url)
    chunks = state / "downloads" / artifact_id / "chunks"
    control = hub.control
    assert control is not None

    def run_agent() -> tuple[Agent, threading.Thread]:
        agent = Agent(state, AgentConfig.load(state))
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        return agent, thread

    agent, thread = run_agent()
    wait_for("device online", lambda: online(hub))
    control.deploy("gemm", "1.0.0", "device:dev-1")
    wait_for("a third of the chunks", lambda: chunks.is_dir() and len(list(chunks.iterdir())) >= 22)
    agent.stop_event.set()
    thread.join(timeout=10)
    wait_for("the round is over", lambda: control.chunks_sent >= 65)
    kept = len([p for p in chunks.iterdir() if not p.name.startswith(".")])
    control.shared_above = 1.0  # a re-ask goes per device unless a whole-artifact fetch wants the chunk
    agent, thread = run_agent()
    try:
        wait_for("active", lambda: ModelStore(state / "models").active("gemm"), timeout_s=60)
    finally:
        agent.stop_event.set()
        thread.join(timeout=10)
    assert control.unicast_chunks_sent == 65 - kept and control.chunks_sent == 65 + 65 - kept


def run_agent(state: Path) -> tuple[Agent, threading.Thread]:
    agent = Agent(state, AgentConfig.load(state))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    return agent, thread


def stored_chunks(state: Path, artifact_id: str) -> int:
    chunks = state / "downloads" / artifact_id / "chunks"
    return len([p for p in chunks.iterdir() if not p.name.startswith(".")]) if chunks.is_dir() else 0


def test_broker_killed_mid_transfer_the_download_completes_when_it_is_back(
    hub: Hub, mosquitto: MosquittoProcess, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    artifact_id = register(hub, big_artifact(tmp_path, keys[0]))
    state = device_state(tmp_path, keys, mosquitto.url)
    agent, thread = run_agent(state)
    revived = None
    try:
        wait_for("device online", lambda: online(hub))
        assert hub.control is not None
        hub.control.deploy("gemm", "1.0.0", "device:dev-1")
        wait_for("a third of the chunks", lambda: stored_chunks(state, artifact_id) >= 22)
        mosquitto.process.kill()  # the broker dies mid-transfer, its sessions with it (no persistence)
        mosquitto.process.wait()
        assert not ModelStore(state / "models").active("gemm")
        revived = MosquittoProcess(tmp_path, port=mosquitto.port)
        wait_for("active after the broker came back", lambda: ModelStore(state / "models").active("gemm"),
                 timeout_s=90)  # fmt: skip
        wait_for("the hub sees it active", lambda: (hub.registry.device("dev-1")["reported"] or {})
                 .get("models", [{}])[0].get("state") == "active", timeout_s=30)  # fmt: skip
    finally:
        agent.stop_event.set()
        thread.join(timeout=10)
        if revived is not None:
            revived.stop()


def test_a_corrupt_chunk_on_the_wire_is_refused(
    hub: Hub, mosquitto: MosquittoProcess, tmp_path: Path, keys: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    artifact_id = register(hub, big_artifact(tmp_path, keys[0]))
    state = device_state(tmp_path, keys, mosquitto.url)
    agent, thread = run_agent(state)
    forger = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="forger")
    forger.connect("127.0.0.1", mosquitto.port)
    forger.loop_start()
    try:
        wait_for("device online", lambda: online(hub))
        assert hub.control is not None
        hub.control.deploy("gemm", "1.0.0", "device:dev-1")
        wait_for("the download under way", lambda: stored_chunks(state, artifact_id) >= 5)
        forged = Chunk(1, 60, os.urandom(CHUNK)).to_wire()  # the real (1, 60) is about 55 chunks behind
        forger.publish(hub.topics.chunks(artifact_id), forged, qos=1).wait_for_publish(timeout=5)
        wait_for("active", lambda: ModelStore(state / "models").active("gemm"), timeout_s=60)
    finally:
        forger.loop_stop()
        agent.stop_event.set()
        thread.join(timeout=10)
    assert "bad chunk" in caplog.text and "wrong sha256" in caplog.text
    active = ModelStore(state / "models").active("gemm")
    assert active is not None and active.artifact_id == artifact_id  # the store verified every file again


def test_the_hub_never_sends_a_chunk_rotten_on_its_disk_and_adding_again_repairs_it(
    hub: Hub, mosquitto: MosquittoProcess, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    source = big_artifact(tmp_path, keys[0])
    artifact_id = register(hub, source)
    rotten = hub.store.path(artifact_id) / "weights.bin"
    data = bytearray(rotten.read_bytes())
    data[3 * CHUNK + 7] ^= 0xFF  # one bit flip in chunk (1, 3) of the hub's copy
    rotten.write_bytes(bytes(data))
    state = device_state(tmp_path, keys, mosquitto.url)
    agent, thread = run_agent(state)
    control = hub.control
    assert control is not None
    try:
        wait_for("device online", lambda: online(hub))
        control.deploy("gemm", "1.0.0", "device:dev-1")
        wait_for("the rotten chunk held back", lambda: control.corrupt_chunks >= 1)
        wait_for("the rest delivered", lambda: stored_chunks(state, artifact_id) == 64)
        assert not ModelStore(state / "models").active("gemm")
        hub.store.add(source)  # the operator adds the artifact again: the rotten copy is replaced
        wait_for("active after the repair", lambda: ModelStore(state / "models").active("gemm"), timeout_s=30)
    finally:
        agent.stop_event.set()
        thread.join(timeout=10)
