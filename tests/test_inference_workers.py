"""`cloud-hub serve --inference-processes 2`: two worker processes answer on one gRPC port, share the
registry (new versions, usage counts), and a killed worker is replaced."""

from __future__ import annotations

import os
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
from common import HubProcess
from conftest import MosquittoProcess, make_artifact, wait_for

from cloud_hub.api_client import AdminClient
from cloud_hub.inference import InferenceOptions
from cloud_hub.server import Hub, HubConfig, operator_token
from edge_agent.protocol.oip import InferenceStub, pb

CONNECTIONS = 16  # each lands on a process chosen by the kernel: all 16 on one has odds 2**-15
X = np.ones((1, 32), np.float32)


@pytest.fixture
def hub(mosquitto: MosquittoProcess, tmp_path: Path, keys: tuple[Path, Path]) -> Iterator[Hub]:
    state = tmp_path / "hub"
    (state / "trust").mkdir(parents=True)
    shutil.copy(keys[1], state / "trust")
    hub = Hub(HubConfig(state, broker=mosquitto.url, grpc_port=0, admin_port=0,
                        inference=InferenceOptions(processes=2)))  # fmt: skip
    hub.start()
    yield hub
    hub.stop()


def connections(port: int) -> list[Any]:
    """Stubs over separate TCP connections (a local subchannel pool each)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    return [InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}", options=options)) for _ in range(CONNECTIONS)]


def infer(stub: Any) -> str:
    request = pb.ModelInferRequest(model_name="gemm")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 32])
    request.raw_input_contents.append(X.tobytes())
    response = stub.ModelInfer(request, timeout=10, metadata=(("x-edgefed-device", "cam-1"),))
    return str(response.model_version)


def test_processes_share_port_versions_and_usage(hub: Hub, tmp_path: Path, keys: tuple[Path, Path]) -> None:
    assert hub.admin is not None
    admin = AdminClient(f"http://127.0.0.1:{hub.admin.port}", operator_token(hub.config.state_dir))
    admin.add_artifact(make_artifact(tmp_path / "v1", keys[0], version="1.0.0"))
    stubs = connections(hub.grpc_port)
    assert {infer(stub) for stub in stubs for _ in range(5)} == {"1.0.0"}
    assert len(serving_pids(hub)) == 2  # both processes hold answered connections

    admin.add_artifact(make_artifact(tmp_path / "v2", keys[0], version="2.0.0", release=2, seed=1))
    assert {infer(stub) for stub in stubs} == {"2.0.0"}  # every process re-resolved at once

    hub.stop()  # workers flush their usage counts on the way out
    assert sum(row["calls"] for row in hub.registry.usage() if row["device_id"] == "cam-1") == 6 * CONNECTIONS


def test_a_killed_worker_is_replaced(hub: Hub, tmp_path: Path, keys: tuple[Path, Path]) -> None:
    assert hub.admin is not None and hub.workers is not None
    AdminClient(f"http://127.0.0.1:{hub.admin.port}", operator_token(hub.config.state_dir)).add_artifact(
        make_artifact(tmp_path / "v1", keys[0])
    )
    os.kill(hub.workers.processes[0].pid or 0, signal.SIGKILL)
    wait_for("the worker to be replaced", lambda: hub.workers and hub.workers.restarts == 1, timeout_s=30)

    def answers_on_both() -> bool:
        stubs = connections(hub.grpc_port)
        return {infer(stub) for stub in stubs} == {"1.0.0"} and len(serving_pids(hub)) == 2

    wait_for("the new worker to answer", answers_on_both, timeout_s=60)


def serving_pids(hub: Hub) -> set[int]:
    """The worker processes holding established connections on the gRPC port."""
    assert hub.workers is not None
    pids = {p.pid for p in hub.workers.processes if p.pid is not None}
    return {pid for pid in pids if any(c.laddr and c.laddr.port == hub.grpc_port and c.status == psutil.CONN_ESTABLISHED
                                       for c in psutil.Process(pid).net_connections("tcp"))}  # fmt: skip


def test_a_taken_port_is_reported(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        hub = Hub(HubConfig(tmp_path / "hub", broker=mosquitto.url, grpc_port=port, admin_port=0,
                            inference=InferenceOptions(processes=2)))  # fmt: skip
        with pytest.raises(RuntimeError, match="--grpc-port"):
            hub.start()
        hub.stop()


def test_workers_stop_when_the_hub_is_killed(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    hub = HubProcess(tmp_path, keys[1], "--inference-processes", "2")
    workers = psutil.Process(hub.process.pid).children()
    assert len(workers) >= 2
    hub.process.kill()
    hub.process.wait(timeout=10)
    _, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, f"workers outlived the hub: {alive}"


def test_model_statistics_add_up_every_process(hub: Hub, tmp_path: Path, keys: tuple[Path, Path]) -> None:
    assert hub.admin is not None
    AdminClient(f"http://127.0.0.1:{hub.admin.port}", operator_token(hub.config.state_dir)).add_artifact(
        make_artifact(tmp_path / "v1", keys[0])
    )
    stubs = connections(hub.grpc_port)
    for stub in stubs:
        for _ in range(3):
            infer(stub)
    assert len(serving_pids(hub)) == 2

    def counts() -> set[int]:  # as each connection's process answers
        request = pb.ModelStatisticsRequest(name="gemm")
        return {stub.ModelStatistics(request, timeout=5).model_stats[0].inference_count for stub in stubs}

    wait_for("every process's calls in the statistics", lambda: counts() == {3 * CONNECTIONS}, timeout_s=10)
