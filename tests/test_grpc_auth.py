"""`cloud-hub serve --require-token` on a real hub (Mosquitto, gRPC on port 0): every model and server
call but the liveness/readiness probes needs a device's token, and a removed device's token is refused
on its very next call (issue 14, observation 5)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import MosquittoProcess, make_artifact

from cloud_hub.inference import InferenceOptions
from cloud_hub.server import Hub, HubConfig
from edge_agent.protocol.oip import InferenceStub, pb


@pytest.fixture
def hub(mosquitto: MosquittoProcess, tmp_path: Path, keys: tuple[Path, Path]) -> Iterator[Hub]:
    state = tmp_path / "hub"
    (state / "trust").mkdir(parents=True)
    shutil.copy(keys[1], state / "trust")
    running = Hub(HubConfig(state, broker=mosquitto.url, grpc_port=0, admin_port=0,
                            inference=InferenceOptions(require_token=True)))  # fmt: skip
    running.start()
    yield running
    running.stop()


def enrolled_token(hub: Hub, device_id: str) -> str:
    token = hub.enroll_token([], {}, 60)["token"]
    return str(hub.enroll(token, device_id, "x86-64-generic")["cloud_token"])


def calls(stub: InferenceStub) -> dict[str, Any]:
    """One request per protected RPC."""
    infer = pb.ModelInferRequest(model_name="gemm")
    infer.inputs.add(name="input", datatype="FP32", shape=[1, 32])
    infer.raw_input_contents.append(np.ones((1, 32), np.float32).tobytes())
    return {
        "ServerMetadata": lambda md: stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=md, timeout=5),
        "ModelMetadata": lambda md: stub.ModelMetadata(pb.ModelMetadataRequest(name="gemm"), metadata=md, timeout=5),
        "ModelReady": lambda md: stub.ModelReady(pb.ModelReadyRequest(name="gemm"), metadata=md, timeout=5),
        "ModelStatistics": lambda md: stub.ModelStatistics(pb.ModelStatisticsRequest(name="gemm"), metadata=md),
        "ModelInfer": lambda md: stub.ModelInfer(infer, metadata=md, timeout=5),
    }


def assert_refused(call: Any, metadata: Any, why: str) -> None:
    try:
        call(metadata)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, f"{why}: got {exc.code()}"
    else:
        pytest.fail(why)


def test_every_call_but_the_probes_needs_a_token(hub: Hub, tmp_path: Path, keys: tuple[Path, Path]) -> None:
    hub.add_artifact(_tar(make_artifact(tmp_path / "gemm", keys[0]), tmp_path / "gemm.tar"))
    token = enrolled_token(hub, "dev-1")
    with grpc.insecure_channel(f"127.0.0.1:{hub.grpc_port}") as channel:
        stub = InferenceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live  # probes stay open
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
        for name, call in calls(stub).items():
            for metadata in ((), (("authorization", "Bearer not-a-token"),), (("x-edgefed-device", "dev-1"),)):
                assert_refused(call, metadata, f"{name} answered without a valid token ({metadata}): "
                               "--require-token must cover it")  # fmt: skip
            call((("authorization", f"Bearer {token}"),))  # the device's own token: answered


def test_a_removed_devices_token_is_refused_at_once(hub: Hub, tmp_path: Path, keys: tuple[Path, Path]) -> None:
    hub.add_artifact(_tar(make_artifact(tmp_path / "gemm", keys[0]), tmp_path / "gemm.tar"))
    token, other = enrolled_token(hub, "dev-1"), enrolled_token(hub, "dev-2")
    with grpc.insecure_channel(f"127.0.0.1:{hub.grpc_port}") as channel:
        infer = calls(InferenceStub(channel))["ModelInfer"]
        for _ in range(3):  # used, so a cache (if any) holds its owner
            infer((("authorization", f"Bearer {token}"),))
        hub.remove_device("dev-1")
        assert_refused(
            infer,
            (("authorization", f"Bearer {token}"),),
            "a removed device's token still works: TokenOwners must not cache an owner past removal",
        )
        infer((("authorization", f"Bearer {other}"),))  # another device is unaffected
    hub.flush_usage()
    assert {(r["device_id"], r["model"]) for r in hub.registry.usage()} == {("dev-1", "gemm"), ("dev-2", "gemm")}


def _tar(directory: Path, out: Path) -> Path:
    import tarfile

    with tarfile.open(out, "w") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=path.name)
    return out
