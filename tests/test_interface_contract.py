"""One interface per model version, the right artifact on the cloud route, and the SDK's side of the
contract (issue 10): registration rules on a real registry and hub, the OIP server on port 0, the SDK
against it and against a server that names outputs its own way (as KServe does)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import InferenceServer, make_artifact
from test_fallback import device

from cloud_hub.errors import Conflict
from cloud_hub.registration import check_registration
from cloud_hub.registry import SQLiteRegistry
from edge_agent import ConfigError, EdgeClient, InputMismatch
from edge_agent.cloud import CloudClient, named_outputs
from edge_agent.protocol.artifact import read_manifest, seal
from edge_agent.protocol.oip import InferenceStub, add_servicer, pb
from edge_agent.protocol.oip.tensors import datatype_of, from_raw, to_raw
from edge_agent.protocol.signing import TrustStore, load_private_key

X = np.random.default_rng(3).standard_normal((2, 32)).astype(np.float32)


def resealed(artifact: Path, key: Path, **changes: Any) -> Path:
    """The same model files under a manifest with ``changes`` (another profile, release, output name...)."""
    document = json.loads((artifact / "manifest.json").read_text())
    fields = {k: v for k, v in document.items() if k not in ("files", "chunk_size", "schema")}
    (artifact / "manifest.json").unlink()
    (artifact / "signature").unlink()
    seal(artifact, {**fields, **changes}, load_private_key(key))
    return artifact


def pi_artifact(directory: Path, key: Path, release: int, **changes: Any) -> Path:
    """A Raspberry Pi (aarch64) artifact of gemm: the hub on x86 cannot serve it."""
    artifact = make_artifact(directory, key, release=release, profile="raspberry-pi-4")
    hardware = {"profile": "raspberry-pi-4", "arch": "aarch64", "accelerator": "none"}
    return resealed(artifact, key, hardware=hardware, **changes)


def register(registry: SQLiteRegistry, artifact: Path, trust: TrustStore, allow: bool = False) -> None:
    manifest = read_manifest(artifact, trust)
    check_registration(registry, manifest, allow)
    registry.add_artifact(manifest, {})


def test_one_release_and_one_interface_per_version(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    registry, trust = SQLiteRegistry(str(tmp_path / "registry.db")), TrustStore.from_dir(keys[1].parent)
    register(registry, make_artifact(tmp_path / "x86", keys[0], release=5), trust)
    with pytest.raises(Conflict, match=r"registered with release 5.*--release 5"):
        register(registry, pi_artifact(tmp_path / "pi-6", keys[0], release=6), trust)
    renamed = [{"name": "logits", "dtype": "float32", "shape": ["batch", 30]}]
    with pytest.raises(Conflict, match=r"output 'output' removed; output 'logits' added"):
        register(registry, pi_artifact(tmp_path / "pi-renamed", keys[0], release=5, outputs=renamed), trust)
    batch_one = [{"name": "input", "dtype": "float32", "shape": [1, 32]}]
    with pytest.raises(Conflict, match=r"input 'input': float32 \['batch', 32\] -> float32 \[1, 32\]"):
        register(registry, pi_artifact(tmp_path / "pi-batch", keys[0], release=5, inputs=batch_one), trust)
    register(registry, pi_artifact(tmp_path / "pi", keys[0], release=5), trust)
    assert {(a["profile"], a["release"]) for a in registry.artifacts("gemm")} == {
        ("x86-64-generic", 5), ("raspberry-pi-4", 5)}  # fmt: skip


def test_a_new_version_keeps_the_interface_unless_its_major_changes(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    registry, trust = SQLiteRegistry(str(tmp_path / "registry.db")), TrustStore.from_dir(keys[1].parent)
    register(registry, make_artifact(tmp_path / "1.0.0", keys[0], release=1), trust)
    renamed = [{"name": "logits", "dtype": "float32", "shape": ["batch", 30]}]
    minor = resealed(make_artifact(tmp_path / "1.1.0", keys[0], version="1.1.0", release=2), keys[0], outputs=renamed)
    with pytest.raises(Conflict, match=r"changes the interface of gemm@1\.0\.0: output 'output' removed.*"
                                       r"higher major.*--allow-interface-change"):  # fmt: skip
        register(registry, minor, trust)
    register(registry, minor, trust, allow=True)  # the operator said so
    major = make_artifact(tmp_path / "2.0.0", keys[0], version="2.0.0", release=3)
    register(registry, major, trust)  # back to 'output': a new major may change anything
    with pytest.raises(Conflict, match=r"release 3 already belongs to gemm@2\.0\.0"):
        register(registry, make_artifact(tmp_path / "2.1.0", keys[0], version="2.1.0", release=3), trust)


@pytest.fixture
def cloud(tmp_path: Path, keys: tuple[Path, Path]) -> Iterator[InferenceServer]:
    """The hub's OIP server serving profile x86-64-generic."""
    server = InferenceServer(tmp_path / "hub", keys)
    yield server
    server.stop()


def test_the_cloud_serves_the_artifact_of_its_own_profile(tmp_path: Path, keys: tuple[Path, Path],
                                                         cloud: InferenceServer) -> None:  # fmt: skip
    """Observation 1: a Pi artifact of the same version with a newer release (as each profile's compile
    used to get) was served, and failed: NO_SUCHFILE model.onnx. Now the hub serves the artifact its
    profile can run (and registration refuses the odd release: test_one_release_and_one_interface_...)."""
    cloud.register(make_artifact(tmp_path / "x86", keys[0], release=7))
    pi = pi_artifact(tmp_path / "pi", keys[0], release=8, runtime="tflite")
    (pi / "model.onnx").rename(pi / "model.tflite")
    cloud.register(resealed(pi, keys[0]))
    with CloudClient(cloud.url) as client:
        version, outputs = client.infer("gemm", {"input": X}, "1.0.0")
        assert version == "1.0.0" and outputs["output"].shape == (2, 30)
        assert client.infer("gemm", {"input": X}, "7")[0] == "1.0.0"  # a Triton-style version is a release


def test_a_version_with_no_servable_artifact_is_not_ready_and_says_why(tmp_path: Path, keys: tuple[Path, Path],
                                                                      cloud: InferenceServer) -> None:  # fmt: skip
    cloud.register(pi_artifact(tmp_path / "pi", keys[0], release=1))
    with grpc.insecure_channel(f"127.0.0.1:{cloud.port}") as channel:
        stub = InferenceStub(channel)
        assert not stub.ModelReady(pb.ModelReadyRequest(name="gemm", version="1.0.0"), timeout=5).ready
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelMetadata(pb.ModelMetadataRequest(name="gemm", version="1.0.0"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "built for raspberry-pi-4" in str(caught.value.details())
    assert "--profile x86-64-generic" in str(caught.value.details())


def _request(inputs: dict[str, np.ndarray], model: str = "gemm") -> Any:
    request = pb.ModelInferRequest(model_name=model)
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype=datatype_of(array), shape=array.shape)
        request.raw_input_contents.append(to_raw(array))
    return request


def test_oip_refuses_caller_mistakes_as_invalid_argument(tmp_path: Path, keys: tuple[Path, Path],
                                                         cloud: InferenceServer) -> None:  # fmt: skip
    from conftest import dtypes_artifact

    cloud.register(make_artifact(tmp_path / "gemm", keys[0]))
    cloud.register(dtypes_artifact(tmp_path / "dtypes", keys[0]))
    with grpc.insecure_channel(f"127.0.0.1:{cloud.port}") as channel:
        stub = InferenceStub(channel)
        twice = _request({"input": X})
        twice.inputs.add(name="input", datatype="FP32", shape=X.shape)
        twice.raw_input_contents.append(to_raw(X))
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(twice, timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "given twice" in str(caught.value.details())
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelStatistics(pb.ModelStatisticsRequest(name="no-such-model"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="dtypes"), timeout=5)
        inputs = {t.name: _zeros(t.datatype) for t in metadata.inputs}
        inputs["in_bytes"] = np.array([[b"ok", b"\xff\xfe", b"x"]], dtype=object)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(_request(inputs, "dtypes"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in str(caught.value.details())


def _zeros(datatype: str) -> np.ndarray:
    from edge_agent.protocol.oip.tensors import DATATYPES

    if datatype == "BYTES":
        return np.array([[b"a", b"b", b"c"]], dtype=object)
    return np.zeros((1, 3), dtype=DATATYPES[datatype][0])


def test_inputs_are_checked_before_either_route(tmp_path: Path, keys: tuple[Path, Path],
                                               cloud: InferenceServer) -> None:  # fmt: skip
    """A caller's mistake is refused locally, so it never costs a cloud call nor trips the cloud breaker."""
    cloud.register(make_artifact(tmp_path / "gemm", keys[0]))
    state = device(tmp_path, keys, None, cloud.url)
    with EdgeClient(state, policy="cloud_only", telemetry=False) as client:
        for _ in range(5):
            with pytest.raises(InputMismatch, match="input 'input'"):
                client.infer("gemm", {"input": np.ones((1, 31), np.float32)})
        assert client.cloud_breaker.failures == 0
        info = client.model_info("gemm")
        assert info.active_version is None and info.interface is not None
        assert [t.name for t in info.interface.outputs] == ["output"]
        assert client.infer("gemm", {"input": X}).outputs["output"].shape == (2, 30)
    assert sum(cloud.usage.drain().values()) == 1  # only the good call reached the server
    [(success, fail, *_)] = cloud.repository.statistics().values()
    assert (success, fail) == (1, 0)  # the server never saw the bad ones


class ThirdPartyServicer:
    """An OIP server that behaves as KServe's Python ModelServer does by default (names its output
    ``output-0``, answers with an empty model version, ignores the outputs asked for), in-process; the
    real KServe, in a venv of its own, is tests/test_kserve_cloud.py's peer."""

    def __init__(self, weights: np.ndarray) -> None:
        self.weights = weights

    def __getattr__(self, method: str) -> Any:  # every other RPC (the stream too): UNIMPLEMENTED, as KServe
        def unimplemented(request: Any, context: Any) -> Any:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented")

        return unimplemented

    def ModelInfer(self, request: Any, context: Any) -> Any:
        x = from_raw(request.raw_input_contents[0], request.inputs[0].datatype, request.inputs[0].shape)
        y = (x @ self.weights).astype(np.float32)
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="")
        response.outputs.add(name="output-0", datatype="FP32", shape=y.shape)
        response.raw_output_contents.append(to_raw(y))
        return response


def test_result_keys_are_the_interface_names_whichever_route_answers(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    add_servicer(ThirdPartyServicer(np.ones((32, 30), np.float32)), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        state = device(tmp_path, keys, make_artifact(tmp_path / "gemm", keys[0]), f"grpc://127.0.0.1:{port}")
        with EdgeClient(state, policy="cloud_first", telemetry=False) as client:
            cloud = client.infer("gemm", {"input": X})
            client.policy = "local_only"
            local = client.infer("gemm", {"input": X})
        assert cloud.route == "cloud" and local.route == "local"
        assert list(cloud.outputs) == list(local.outputs) == ["output"]
        assert cloud.version == "1.0.0"  # the version asked for, when the server leaves it empty
    finally:
        server.stop(0)
    assert list(named_outputs({"a": X, "b": X}, ("b",), "x")) == ["b"]


def test_over_budget_calls_stay_local_and_are_counted(tmp_path: Path, keys: tuple[Path, Path],
                                                     cloud: InferenceServer) -> None:  # fmt: skip
    """Observation 2: calls over the profile's budget moved ~97 % of traffic to the cloud, silently, and
    the first call's model load counted as a breach. Now breaches are counted and the route stays local."""
    cloud.register(make_artifact(tmp_path / "cloud-gemm", keys[0]))
    state = device(tmp_path, keys, make_artifact(tmp_path / "gemm", keys[0]), cloud.url)
    with EdgeClient(state, telemetry=False) as client:
        began = time.perf_counter()
        first = client.infer("gemm", {"input": X})  # loads and warms the model: not part of latency or budget
        whole_ms = (time.perf_counter() - began) * 1000
        assert first.route == "local" and first.latency_ms * 2 < whole_ms
    with EdgeClient(state, latency_budget_ms=0.0001) as client:
        routes = [client.infer("gemm", {"input": X}) for _ in range(20)]
        assert client.budget_breaches == 20
    assert {r.route for r in routes} == {"local"} and "over the 0.0001 ms budget" in routes[-1].reason
    assert sum(cloud.usage.drain().values()) == 0
    from edge_agent.telemetry import SPOOL_FILE, Spool

    spool = Spool(state / SPOOL_FILE)
    batch = spool.next_batch("dev-1")
    assert batch is not None
    assert sum(w.budget_breaches for w in batch.windows if w.route == "local") == 20
    assert spool.counter("budget_breaches") == 20


def test_state_directory_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="typo does not exist"):
        EdgeClient(tmp_path / "typo")
    assert not (tmp_path / "typo").exists()


def test_close_after_ainfer_inside_a_running_event_loop(tmp_path: Path, keys: tuple[Path, Path],
                                                        cloud: InferenceServer) -> None:  # fmt: skip
    cloud.register(make_artifact(tmp_path / "gemm", keys[0]))
    state = device(tmp_path, keys, None, cloud.url)

    async def app() -> None:
        client = EdgeClient(state, policy="cloud_only", telemetry=False)
        result = await client.ainfer("gemm", {"input": X})
        assert result.route == "cloud"
        client.close()  # closes the pooled streams from inside this loop
        assert client._cloud is not None and client._cloud._idle.empty()

    asyncio.run(app())


def test_a_manifest_from_the_previous_schema_still_installs(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """Devices upgraded to manifest/2 keep the models an older compiler signed (schema /1, no max_batch)."""
    from edge_agent.protocol.canonical import canonical_json, sha256_hex
    from edge_agent.protocol.manifest import SCHEMA_V1
    from edge_agent.protocol.signing import sign_document

    artifact = make_artifact(tmp_path / "old", keys[0])
    document = json.loads((artifact / "manifest.json").read_text())
    del document["max_batch"]
    document["schema"] = SCHEMA_V1
    (artifact / "manifest.json").write_text(json.dumps(document))
    (artifact / "signature").write_text(json.dumps(sign_document(document, load_private_key(keys[0]))))
    manifest = read_manifest(artifact, TrustStore.from_dir(keys[1].parent))
    assert manifest.artifact_id == sha256_hex(canonical_json(document)) and manifest.max_batch == 0
    state = device(tmp_path, keys, artifact, None)
    with EdgeClient(state, telemetry=False) as client:
        assert client.infer("gemm", {"input": X}).outputs["output"].shape == (2, 30)


def test_bad_data_the_runtime_finds_is_the_callers_error(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """Bytes that are not UTF-8 reach ONNX Runtime's string input: InputMismatch, and the local breaker
    (which would send later good calls to the cloud) stays closed."""
    from conftest import DTYPES, dtypes_artifact, free_port

    state = device(tmp_path, keys, dtypes_artifact(tmp_path / "dtypes", keys[0]), f"grpc://127.0.0.1:{free_port()}")
    good = {f"in_{k}": np.zeros((1, 3), d) for k, (d, _) in DTYPES.items() if d != "bytes"}
    good["in_bytes"] = np.array([[b"a", b"b", b"c"]], dtype=object)
    bad = {**good, "in_bytes": np.array([[b"a", b"\xff", b"c"]], dtype=object)}
    with EdgeClient(state, telemetry=False, cloud_timeout_s=0.2) as client:
        for _ in range(4):
            with pytest.raises(InputMismatch, match="in_bytes"):
                client.infer("dtypes", bad)
        assert client.infer("dtypes", good).route == "local"
        assert client._local_breakers["dtypes"].failures == 0


def test_cloud_first_answers_locally_when_the_cloud_lacks_the_version(tmp_path: Path, keys: tuple[Path, Path],
                                                                      cloud: InferenceServer) -> None:  # fmt: skip
    cloud.register(make_artifact(tmp_path / "cloud-2", keys[0], version="2.0.0", release=2))
    state = device(tmp_path, keys, make_artifact(tmp_path / "local-1", keys[0]), cloud.url)
    with EdgeClient(state, policy="cloud_first", telemetry=False) as client:
        result = client.infer("gemm", {"input": X})
    assert result.route == "local" and result.version == "1.0.0" and "cloud failed" in result.reason
