"""The SDK's cloud route against a real KServe 0.21 Python ``ModelServer`` (tests/kserve_peer.py, in
`.kserve-venv`): the hub registers an ONNX model, `cloud-hub export-triton` writes it out, KServe serves
the exported model, and an `EdgeClient` with no local version gets what local ONNX Runtime gets; the
model name, the version, the auth and device headers and every OIP datatype travel as KServe expects;
a KServe that is down is a clear CloudUnavailable within the deadline, then the breaker's error."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import DTYPES, dtypes_artifact, free_port, make_artifact
from kserve_peer import KServeProcess, kserve_installed, missing_message
from typer.testing import CliRunner

from cloud_hub.api_client import AdminClient
from cloud_hub.cli import app
from cloud_hub.server import operator_token
from device_profiles import get_profile
from edge_agent import EdgeClient
from edge_agent.config import AgentConfig
from edge_agent.errors import CloudUnavailable, InputMismatch, ModelNotDeployed
from edge_agent.protocol.signing import TrustStore
from edge_agent.store import ModelStore

X = np.random.default_rng(3).standard_normal((4, 32)).astype(np.float32)
TOKEN = "device-token-for-the-gateway"


@pytest.fixture(autouse=True)
def kserve_venv() -> None:
    if not kserve_installed():  # never skipped: `make test` builds the venv first
        pytest.fail(missing_message(), pytrace=False)


@pytest.fixture
def servers() -> Iterator[list[KServeProcess]]:
    started: list[KServeProcess] = []
    yield started
    for server in started:
        server.stop()


def configured_device(root: Path, keys: tuple[Path, Path], cloud: str, token: str | None = TOKEN) -> Path:
    """A device (dev-1) whose agent.json points the cloud route at ``cloud``, with no model installed."""
    state = root / "device"
    (state / "trust").mkdir(parents=True)
    (state / "trust" / keys[1].name).write_bytes(keys[1].read_bytes())
    AgentConfig(device_id="dev-1", profile="x86-64-generic", cloud=cloud, cloud_token=token).save(state)
    return state


def install(state: Path, artifact: Path) -> None:
    ModelStore(state / "models").install(
        artifact, TrustStore.from_dir(state / "trust"), get_profile("x86-64-generic"), activate=True
    )


def calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def export(hub: Any, model: str, repository: Path) -> dict[str, Any]:
    hub_url, state_dir = f"http://127.0.0.1:{hub.admin.port}", str(hub.config.state_dir)
    command = ["export-triton", model, str(repository), "--json", "--hub", hub_url, "--state-dir", state_dir]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    report: dict[str, Any] = json.loads(result.output)
    return report


def test_exported_model_on_kserve_answers_the_sdk_as_local_onnx_runtime(
    hub: Any, tmp_path: Path, keys: tuple[Path, Path], servers: list[KServeProcess]
) -> None:
    artifact = make_artifact(tmp_path / "gemm", keys[0], release=3)
    AdminClient(f"http://127.0.0.1:{hub.admin.port}", operator_token(hub.config.state_dir)).add_artifact(artifact)
    repository = tmp_path / "models"
    assert export(hub, "gemm@1.0.0", repository)["triton_version"] == 3
    log = tmp_path / "kserve-calls.jsonl"
    # KServe's default ModelMetadata: a custom model that does not describe its tensors (no inputs, no outputs)
    kserve = KServeProcess(tmp_path / "kserve", {"gemm": repository / "gemm"}, "--headers-log", str(log))
    servers.append(kserve)
    state = configured_device(tmp_path, keys, kserve.url)

    with EdgeClient(state, telemetry=False) as client:  # local_first, no local version: the cloud route
        cloud = client.infer("gemm", {"input": X})
        assert (cloud.route, cloud.reason) == ("cloud", "no local version")
        assert list(cloud.outputs) == ["output"] and cloud.outputs["output"].shape == (4, 30)
        with pytest.raises(ModelNotDeployed, match="nope"):  # KServe's NOT_FOUND: the route stays healthy
            client.infer("nope", {"input": X})
        assert client.cloud_breaker.failures == 0
    install(state, artifact)  # the same version locally: both routes must agree
    with EdgeClient(state, policy="local_only", telemetry=False) as client:
        local = client.infer("gemm", {"input": X})
    with EdgeClient(state, policy="cloud_only", telemetry=False) as client:
        pinned = client.infer("gemm", {"input": X})
    assert local.route == "local" and pinned.route == "cloud"
    np.testing.assert_allclose(cloud.outputs["output"], local.outputs["output"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pinned.outputs["output"], local.outputs["output"], rtol=1e-5, atol=1e-6)
    assert pinned.version == "1.0.0"  # KServe answers with an empty version: the one asked for

    seen = calls(log)
    assert [(c["model"], c["version"]) for c in seen] == [("gemm", ""), ("gemm", "1.0.0")]
    for call in seen:  # the SDK's headers reach the model server (KServe itself checks none of them)
        assert call["headers"]["authorization"] == f"Bearer {TOKEN}"
        assert call["headers"]["x-edgefed-device"] == "dev-1"


def test_every_datatype_and_positional_output_names_through_kserve(
    tmp_path: Path, keys: tuple[Path, Path], servers: list[KServeProcess]
) -> None:
    artifact = dtypes_artifact(tmp_path / "dtypes", keys[0])
    log = tmp_path / "kserve-calls.jsonl"
    kserve = KServeProcess(tmp_path / "kserve", {"dtypes": artifact / "model.onnx"}, "--metadata",
                           "--output-names", "positional", "--headers-log", str(log))  # fmt: skip
    servers.append(kserve)
    state = configured_device(tmp_path, keys, kserve.url, token=None)
    feeds = {"in_fp32": np.array([[1.5, -2.0, 3.25]] * 2, np.float32),
             "in_fp16": np.array([[0.5, 1.0, -1.5]] * 2, np.float16),
             "in_int64": np.array([[2**40, -1, 0]] * 2, np.int64), "in_int32": np.array([[7, -8, 9]] * 2, np.int32),
             "in_uint8": np.array([[0, 128, 255]] * 2, np.uint8), "in_bool": np.array([[True, False, True]] * 2),
             "in_bytes": np.array([["a", "bé", ""]] * 2, dtype=object)}  # fmt: skip
    assert set(feeds) == {f"in_{k}" for k in DTYPES}
    with EdgeClient(state, telemetry=False) as client:
        with pytest.raises(InputMismatch, match="in_fp32"):  # KServe's metadata checks inputs before the call
            client.infer("dtypes", {**feeds, "in_fp32": feeds["in_fp32"].astype(np.float64)})
        cloud = client.infer("dtypes", feeds)
    assert len(calls(log)) == 1  # the refused call never reached KServe
    install(state, artifact)
    with EdgeClient(state, policy="local_only", telemetry=False) as client:
        local = client.infer("dtypes", feeds)
    assert cloud.route == "cloud" and local.route == "local"
    assert list(cloud.outputs) == list(local.outputs) == [f"out_{k}" for k in DTYPES]  # KServe said output-N
    for name, expected in local.outputs.items():
        got = cloud.outputs[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        if name == "out_bytes":
            assert [[v if isinstance(v, bytes) else v.encode() for v in row] for row in expected.tolist()] == \
                got.tolist() == [[b"a", "bé".encode(), b""]] * 2  # fmt: skip
        else:
            np.testing.assert_array_equal(got, expected, err_msg=name)


def test_kserve_down_is_a_clear_error_within_the_deadline_then_the_breaker(
    tmp_path: Path, keys: tuple[Path, Path], servers: list[KServeProcess]
) -> None:
    model = tmp_path / "gemm.onnx"
    make_artifact(tmp_path / "gemm", keys[0])
    model.write_bytes((tmp_path / "gemm" / "model.onnx").read_bytes())
    kserve = KServeProcess(tmp_path / "kserve", {"gemm": model})
    servers.append(kserve)
    state = configured_device(tmp_path, keys, kserve.url)
    with EdgeClient(state, policy="cloud_only", cloud_timeout_s=1.0, telemetry=False) as client:
        assert client.infer("gemm", {"input": X}).route == "cloud"
        kserve.stop()
        began = time.monotonic()  # retried (each try a breaker failure) while the deadline allows
        with pytest.raises(CloudUnavailable, match=f"cloud {kserve.url}: UNAVAILABLE") as caught:
            client.infer("gemm", {"input": X})
        assert time.monotonic() - began < 1.5 and "Connection refused" in str(caught.value)
        began = time.monotonic()
        with pytest.raises(CloudUnavailable, match="cloud breaker open"):
            client.infer("gemm", {"input": X})
        assert time.monotonic() - began < 0.1  # the open breaker answers at once
        restarted = KServeProcess(tmp_path / "kserve", {"gemm": model}, grpc_port=kserve.grpc_port)
        servers.append(restarted)
        deadline = time.monotonic() + 10  # half-open after 1 s, reconnect backoff capped at 1 s
        while True:
            try:
                assert client.infer("gemm", {"input": X}).route == "cloud"
                break
            except CloudUnavailable:
                assert time.monotonic() < deadline, "the SDK did not use the restarted KServe again"
                time.sleep(0.2)
    nobody = configured_device(tmp_path / "other", keys, f"grpc://127.0.0.1:{free_port()}")
    with EdgeClient(nobody, cloud_timeout_s=0.5, telemetry=False) as client:  # local_first, nothing local
        began = time.monotonic()
        # the interface lookup (ModelMetadata) fails first and counts against the breaker, so the call's
        # own tries open it: the error is the breaker's, in this very call
        with pytest.raises(CloudUnavailable, match=r"UNAVAILABLE|cloud breaker open"):
            client.infer("gemm", {"input": X})
        assert time.monotonic() - began < 1.0
