"""`cloud-hub export-triton NAME@VERSION DIR` against a running hub: the config.pbtxt parses with
Triton's own ModelConfig schema and matches the manifest; ONNX Runtime loads the exported model.onnx
and answers as the hub does; TFLite-only versions are refused with what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from conftest import dtypes_artifact, make_artifact
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from typer.testing import CliRunner

from cloud_hub.api_client import AdminClient
from cloud_hub.cli import app
from cloud_hub.server import operator_token
from edge_agent.cloud import CloudClient
from edge_agent.protocol.artifact import seal
from edge_agent.protocol.signing import load_private_key


def export(hub: Any, *args: str) -> Any:
    command = ["export-triton", *args, "--hub", f"http://127.0.0.1:{hub.admin.port}",
               "--state-dir", str(hub.config.state_dir)]  # fmt: skip
    return CliRunner().invoke(app, command)


def parse_config(path: Path) -> Any:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def reseal(artifact: Path, key: Path, **changes: Any) -> Path:
    document = json.loads((artifact / "manifest.json").read_text())
    fields = {k: v for k, v in document.items() if k not in ("files", "chunk_size", "schema")}
    (artifact / "manifest.json").unlink()
    (artifact / "signature").unlink()
    seal(artifact, {**fields, **changes}, load_private_key(key))
    return artifact


def tflite_artifact(directory: Path, key: Path, name: str) -> Path:
    """A Raspberry Pi TFLite artifact (the bytes need not be a real TFLite model: the hub never runs it)."""
    artifact = make_artifact(directory, key, name=name, profile="raspberry-pi-4")
    (artifact / "model.onnx").rename(artifact / "model.tflite")
    return reseal(artifact, key, runtime="tflite",
                  hardware={"profile": "raspberry-pi-4", "arch": "aarch64", "accelerator": "none"})  # fmt: skip


@pytest.fixture
def admin(hub: Any) -> AdminClient:
    return AdminClient(f"http://127.0.0.1:{hub.admin.port}", operator_token(hub.config.state_dir))


def test_export_writes_a_repository_triton_and_onnx_runtime_accept(hub: Any, admin: AdminClient, tmp_path: Path,
                                                                   keys: tuple[Path, Path]) -> None:  # fmt: skip
    x86 = admin.add_artifact(make_artifact(tmp_path / "x86", keys[0], release=3))
    pi = tflite_artifact(tmp_path / "pi", keys[0], "gemm")
    admin.add_artifact(reseal(pi, keys[0], release=3))  # the same version for the Pi: never the one exported
    repository = tmp_path / "triton"
    result = export(hub, "gemm@1.0.0", str(repository), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["artifact_id"] == x86["artifact_id"] and report["triton_version"] == 3
    assert report["profile"] == "x86-64-generic"
    assert sorted(p.relative_to(repository).as_posix() for p in repository.rglob("*")) == [
        "gemm", "gemm/3", "gemm/3/model.onnx", "gemm/config.pbtxt"]  # fmt: skip
    config = parse_config(repository / "gemm" / "config.pbtxt")
    assert config.name == "gemm" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 32
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("input", model_config_pb2.TYPE_FP32, [32])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("output", model_config_pb2.TYPE_FP32,
                                                                             [30])]  # fmt: skip
    assert config.HasField("dynamic_batching")
    session = ort.InferenceSession(str(repository / "gemm" / "3" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)
    with CloudClient(f"grpc://127.0.0.1:{hub.grpc_port}") as cloud:
        _, outputs = cloud.infer("gemm", {"input": x}, "1.0.0")
    np.testing.assert_allclose(session.run(None, {"input": x})[0], outputs["output"], rtol=1e-5, atol=1e-6)
    again = export(hub, "gemm@3", str(repository))  # a release number names the version too
    assert again.exit_code == 2 and "--force" in again.output
    forced = export(hub, "gemm@3", str(repository), "--force")
    assert forced.exit_code == 0 and "tritonserver --model-repository" in forced.output, forced.output


def test_dtypes_and_dims_without_triton_batching(hub: Any, admin: AdminClient, tmp_path: Path,
                                                 keys: tuple[Path, Path]) -> None:  # fmt: skip
    admin.add_artifact(dtypes_artifact(tmp_path / "dtypes", keys[0]))
    result = export(hub, "dtypes@1.0.0", str(tmp_path / "triton"), "--max-batch-size", "0", "--json")
    assert result.exit_code == 0, result.output
    config = parse_config(tmp_path / "triton" / "dtypes" / "config.pbtxt")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    types = {t.name: model_config_pb2.DataType.Name(t.data_type) for t in config.input}
    assert types == {"in_fp32": "TYPE_FP32", "in_fp16": "TYPE_FP16", "in_int64": "TYPE_INT64",
                     "in_int32": "TYPE_INT32", "in_uint8": "TYPE_UINT8", "in_bool": "TYPE_BOOL",
                     "in_bytes": "TYPE_STRING"}  # fmt: skip
    assert {list(t.dims) == [-1, 3] for t in (*config.input, *config.output)} == {True}
    assert [t.name for t in config.output] == [f"out_{k}" for k in ("fp32", "fp16", "int64", "int32", "uint8",
                                                                     "bool", "bytes")]  # fmt: skip


def test_refusals_name_what_to_do(hub: Any, admin: AdminClient, tmp_path: Path, keys: tuple[Path, Path]) -> None:
    admin.add_artifact(tflite_artifact(tmp_path / "pi", keys[0], "pionly"))
    result = export(hub, "pionly@1.0.0", str(tmp_path / "triton"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "needs an ONNX artifact" in text and "cloud-hub models add" in text
    assert f"--profile {hub.serving_profile.id}" in text  # the profile the hub serves (detected here)
    assert not (tmp_path / "triton").exists()
    unknown = export(hub, "nope@1.0.0", str(tmp_path / "triton"))
    assert unknown.exit_code == 2 and "not registered" in unknown.output
    assert export(hub, "gemm", str(tmp_path / "triton")).exit_code == 2
    admin.add_artifact(make_artifact(tmp_path / "x86", keys[0]))
    too_big = export(hub, "gemm@1.0.0", str(tmp_path / "triton"), "--max-batch-size", "-1")
    assert too_big.exit_code == 2
    help_text = CliRunner().invoke(app, ["export-triton", "--help"]).output
    assert "config.pbtxt" in help_text and "release" in help_text and "--json" in help_text
    shutil.rmtree(tmp_path / "triton", ignore_errors=True)
