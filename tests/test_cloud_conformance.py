"""The hub's Open Inference Protocol server driven by a standard client, tritonclient.grpc."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from conftest import DTYPES, InferenceServer, dtypes_artifact, make_artifact
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

OIP_NAMES = {"fp32": "FP32", "fp16": "FP16", "int64": "INT64", "int32": "INT32", "uint8": "UINT8",
             "bool": "BOOL", "bytes": "BYTES"}  # fmt: skip


@pytest.fixture
def server(tmp_path: Path, keys: tuple[Path, Path]) -> Iterator[InferenceServer]:
    srv = InferenceServer(tmp_path, keys)
    srv.register(dtypes_artifact(tmp_path / "dtypes", keys[0]))
    srv.register(make_artifact(tmp_path / "gemm", keys[0]))
    yield srv
    srv.stop()


def sample(kind: str) -> np.ndarray:
    values = {"fp32": np.array([[1.5, -2.0, 3.25]], np.float32), "fp16": np.array([[0.5, 1.0, -1.5]], np.float16),
              "int64": np.array([[2**40, -1, 7]], np.int64), "int32": np.array([[-7, 0, 2**30]], np.int32),
              "uint8": np.array([[0, 128, 255]], np.uint8), "bool": np.array([[True, False, True]]),
              "bytes": np.array([[b"edge", b"fed", b"\xc3\xa9t\xc3\xa9"]], dtype=np.object_)}  # fmt: skip
    return np.repeat(values[kind], 2, axis=0)


def test_metadata_and_health(server: InferenceServer) -> None:
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata().name == "edgefed-hub"
    assert client.is_model_ready("gemm") and not client.is_model_ready("nope")
    meta = client.get_model_metadata("dtypes")
    assert meta.versions == ["1.0.0"]
    assert {i.name: i.datatype for i in meta.inputs} == {f"in_{k}": v for k, v in OIP_NAMES.items()}
    assert list(meta.inputs[0].shape) == [-1, 3]


def test_infer_every_datatype_with_raw_contents(server: InferenceServer) -> None:
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    inputs = []
    for kind, oip in OIP_NAMES.items():
        tensor = triton.InferInput(f"in_{kind}", [2, 3], oip)
        tensor.set_data_from_numpy(sample(kind))
        inputs.append(tensor)
    result = client.infer("dtypes", inputs)
    assert result.get_response().model_version == "1.0.0"
    for kind in DTYPES:
        got, want = result.as_numpy(f"out_{kind}"), sample(kind)
        if kind == "bytes":
            assert [bytes(v) for v in got.reshape(-1)] == list(want.reshape(-1))
        else:
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
    stats = client.get_inference_statistics("dtypes").model_stats[0]
    assert stats.inference_count == 1


def test_infer_with_typed_contents(server: InferenceServer) -> None:
    """Typed ``contents`` (no raw bytes) through Triton's own protobuf classes and stub."""
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = service_pb2.ModelInferRequest(model_name="dtypes")
    fields = {"fp32": "fp32_contents", "int64": "int64_contents", "int32": "int_contents", "uint8": "uint_contents",
              "bool": "bool_contents", "bytes": "bytes_contents"}  # fmt: skip
    for kind, field_name in fields.items():
        tensor = request.inputs.add(name=f"in_{kind}", datatype=OIP_NAMES[kind], shape=[2, 3])
        getattr(tensor.contents, field_name).extend(sample(kind).reshape(-1).tolist())
    tensor = request.inputs.add(name="in_fp16", datatype="FP16", shape=[2, 3])
    tensor.contents.fp32_contents.extend(sample("fp16").astype(np.float32).reshape(-1).tolist())
    response = stub.ModelInfer(request, timeout=5)
    by_name = dict(zip([o.name for o in response.outputs], response.raw_output_contents, strict=True))
    np.testing.assert_array_equal(np.frombuffer(by_name["out_int64"], "<i8").reshape(2, 3), sample("int64"))
    np.testing.assert_array_equal(np.frombuffer(by_name["out_fp16"], "<f2").reshape(2, 3), sample("fp16"))


def test_errors_for_unknown_model_and_bad_shape(server: InferenceServer) -> None:
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    tensor = triton.InferInput("input", [1, 31], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 31), np.float32))
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("nope", [tensor])
    assert "StatusCode.NOT_FOUND" in str(unknown.value.status())
    with pytest.raises(InferenceServerException) as bad:
        client.infer("gemm", [tensor])
    assert "StatusCode.INVALID_ARGUMENT" in str(bad.value.status()) and "input" in bad.value.message()
    wrong_type = triton.InferInput("input", [1, 32], "INT32")
    wrong_type.set_data_from_numpy(np.zeros((1, 32), np.int32))
    with pytest.raises(InferenceServerException, match="float32"):
        client.infer("gemm", [wrong_type])
