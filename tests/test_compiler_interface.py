"""The compiler's half of "one interface per model version", on small ONNX graphs (no training): every
ONNX dtype a manifest can carry (int16, uint16, strings), refusal by name of the others, one release per
version, runs that survive a failing profile, fallback from LiteRT, the latency budget warning,
--max-batch, and a CLI whose --json stdout is only JSON."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from device_profiles import DeviceProfile, get_profile
from edge_agent.protocol.manifest import Manifest, manifest_from_wire
from model_compiler import CompileOptions, ProfileReport, compile_model
from model_compiler.cli import app
from model_compiler.errors import CompileError

ONNX_OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
WORDS = np.array(["cat", "dog", "bird", "fish", "cow", "owl", "cat", "dog"])


def save(path: Path, nodes: list[Any], inputs: list[Any], outputs: list[Any]) -> str:
    model = helper.make_model(helper.make_graph(nodes, path.stem, inputs, outputs), opset_imports=ONNX_OPSETS)
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def int_model(path: Path) -> str:
    """(a int16, b uint16) → (sum float32 = a + b, b_copy uint16), shape [batch, 3]."""
    nodes = [helper.make_node("Cast", ["a"], ["af"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["af", "bf"], ["sum"]),
             helper.make_node("Identity", ["b"], ["b_copy"])]  # fmt: skip
    inputs = [tensor("a", TensorProto.INT16), tensor("b", TensorProto.UINT16)]
    return save(path, nodes, inputs, [tensor("sum", TensorProto.FLOAT), tensor("b_copy", TensorProto.UINT16)])


def tensor(name: str, elem_type: int, shape: list[Any] | None = None) -> Any:
    return helper.make_tensor_value_info(name, elem_type, ["batch", 3] if shape is None else shape)


def string_model(path: Path) -> str:
    """text (strings) → label (int64): a LabelEncoder, as scikit-learn pipelines export them."""
    node = helper.make_node("LabelEncoder", ["text"], ["label"], domain="ai.onnx.ml", keys_strings=list(WORDS[:6]),
                            values_int64s=list(range(6)), default_int64=-1)  # fmt: skip
    return save(
        path, [node], [tensor("text", TensorProto.STRING, ["batch"])], [tensor("label", TensorProto.INT64, ["batch"])]
    )


def int_data(rows: int = 48) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"a": rng.integers(-300, 300, (rows, 3)).astype(np.int16),
            "b": rng.integers(0, 600, (rows, 3)).astype(np.uint16)}  # fmt: skip


def compile_(source: str, profiles: list[str], out: Path, keys: tuple[Path, Path], data: Any = None,
             **options: Any) -> list[ProfileReport]:  # fmt: skip
    data = int_data() if data is None else data
    opts = CompileOptions(**{"name": "m", "version": "1.0.0", "key_path": keys[0], **options})
    return compile_model(source, profiles, (data, None), (data, None), out, opts)


def manifest(report: ProfileReport) -> Manifest:
    assert not report.error, report.error
    return manifest_from_wire(json.loads((Path(report.artifact) / "manifest.json").read_text()))


def with_profiles(monkeypatch: pytest.MonkeyPatch, **changed: DeviceProfile) -> None:
    """Let compile_model see extra (or changed) profiles by id."""
    monkeypatch.setattr("model_compiler.compile.get_profile", lambda name: changed.get(name) or get_profile(name))


def test_int16_and_uint16_compile_with_one_interface(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    reports = compile_(int_model(tmp_path / "ints.onnx"), ["x86-64-generic", "jetson-orin-nano-8gb"], tmp_path / "out",
                       keys, max_batch=16)  # fmt: skip
    x86, jetson = (manifest(r) for r in reports)
    assert [(t.name, t.dtype, t.shape) for t in x86.inputs] == [("a", "int16", ("batch", 3)),
                                                                 ("b", "uint16", ("batch", 3))]  # fmt: skip
    assert [(t.name, t.dtype) for t in x86.outputs] == [("sum", "float32"), ("b_copy", "uint16")]
    assert x86.interface == jetson.interface and x86.max_batch == 16 and x86.release == jetson.release
    trt = json.loads((Path(reports[1].artifact) / "trt_build.json").read_text())
    assert trt["shapes"]["a"] == {"min": [1, 3], "opt": [8, 3], "max": [16, 3]}  # --max-batch, not 64


def test_string_model_compiles_and_pi_falls_back_to_onnxruntime(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    words = {"text": np.tile(WORDS, 8)}  # 'owl' is unknown to the encoder: label -1
    reports = compile_(string_model(tmp_path / "words.onnx"), ["x86-64-generic", "raspberry-pi-4"], tmp_path / "out",
                       keys, data=words)  # fmt: skip
    x86, pi = (manifest(r) for r in reports)
    assert x86.inputs[0].dtype == "bytes" and x86.outputs[0].dtype == "int64" and x86.interface == pi.interface
    assert x86.validation["value"] == 1.0 and x86.validation["metric"] == "top1"  # labels: rows equal to fp32
    assert pi.runtime == "onnxruntime" and (Path(reports[1].artifact) / "model.onnx").exists()
    fallback = pi.validation["fallbacks"][0]
    assert fallback.startswith("tflite: no variant could be built") and "PyTorch factory" in fallback
    assert fallback.endswith("fell back to onnxruntime") and fallback in reports[1].warnings
    reference = json.loads((Path(reports[0].artifact) / "reference.json").read_text())
    assert reference["inputs"] == {} and set(reference["outputs"]) == {"label"}  # no histogram of strings


def test_types_a_manifest_cannot_carry_are_refused_by_name(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    source = save(tmp_path / "complex.onnx", [helper.make_node("Identity", ["x"], ["y"])],
                  [tensor("x", TensorProto.COMPLEX64)], [tensor("y", TensorProto.COMPLEX64)])  # fmt: skip
    with pytest.raises(CompileError, match=r"input 'x' is tensor\(complex64\), which edgefed cannot carry; supported"):
        compile_(source, ["x86-64-generic"], tmp_path / "out", keys, data={"x": np.zeros((4, 3), np.complex64)})
    assert not list((tmp_path / "out").iterdir())  # nothing half-written


def test_one_release_per_version_in_an_output_directory(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    source, out = int_model(tmp_path / "ints.onnx"), tmp_path / "out"
    first = manifest(compile_(source, ["x86-64-generic"], out, keys)[0])
    assert first.release > 1_700_000_000  # no --release: the current Unix time
    later = manifest(compile_(source, ["arm64-server"], out, keys)[0])
    assert later.release == first.release  # the version's release, not a new one
    with pytest.raises(CompileError, match=rf"--release 7 differs from release {first.release} .*leave --release out"):
        compile_(source, ["x86-64-avx512-vnni"], out, keys, release=7)
    with pytest.raises(CompileError, match=r"x86-64-generic, .*arm64-server already exist; remove them"):
        compile_(source, ["x86-64-avx512-vnni", "x86-64-generic", "arm64-server"], out, keys)
    assert not (out / "m-1.0.0-x86-64-avx512-vnni").exists()  # checked before anything was built
    other = manifest(compile_(source, ["x86-64-avx512-vnni"], out, keys, version="2.0.0", release=7)[0])
    assert other.release == 7  # another version is another release


def test_a_failing_profile_keeps_the_others_and_budgets_are_honest(
    tmp_path: Path, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    pi = get_profile("raspberry-pi-4")
    with_profiles(monkeypatch, **{"litert-only": dataclasses.replace(pi, id="litert-only", runtimes=("tflite",)),
                                  "x86-64-generic": dataclasses.replace(get_profile("x86-64-generic"),
                                                                        latency_budget_ms=1e-6)})  # fmt: skip
    reports = compile_(int_model(tmp_path / "ints.onnx"), ["litert-only", "x86-64-generic"], tmp_path / "out", keys)
    failed, x86 = reports
    assert failed.artifact == "" and not (tmp_path / "out" / "m-1.0.0-litert-only").exists()
    assert "no variant passed on any runtime litert-only lists (tflite)" in failed.error
    assert "TFLite export needs a PyTorch factory source" in failed.error  # the real cause, per attempt
    assert [a["kind"] for a in failed.variants] == ["tflite-int8", "tflite-fp32"]
    latency = manifest(x86).latency_ms
    assert latency["over_budget"] is True and latency["budget_ms"] == 1e-6
    assert any("on the build host" in w and "over x86-64-generic's 1e-06 ms budget" in w for w in x86.warnings)


def test_cli_json_is_the_only_stdout_and_a_failed_profile_exits_1(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    source = int_model(tmp_path / "ints.onnx")
    data = int_data()
    np.savez(tmp_path / "data.npz", a=data["a"], b=data["b"])
    noisy = tmp_path / "noisy.py"  # a metric that prints, as converters do, from Python and from C (fd 1)
    noisy.write_text("import os\nimport numpy as np\n\ndef agree(ref, cand):\n    print('python noise')\n"
                     "    os.write(1, b'fd noise\\n')\n"
                     "    return float(np.mean(ref.argmax(1) == cand.argmax(1)))\n")  # fmt: skip
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    pi = (Path(__file__).parents[1] / "device_profiles/profiles/raspberry-pi-4.toml").read_text()
    (profiles / "litert-only.toml").write_text(pi.replace('"raspberry-pi-4"', '"litert-only"')
                                               .replace('["tflite", "onnxruntime"]', '["tflite"]'))  # fmt: skip
    command = [str(Path(sys.executable).parent / "model-compiler"), "compile", source, "-p", "x86-64-generic",
               "-p", "litert-only", "--calib", str(tmp_path / "data.npz"), "--val", str(tmp_path / "data.npz"),
               "--out", str(tmp_path / "out"), "--name", "m", "--version", "1.0.0", "--key", str(keys[0]),
               "--metric", f"{noisy}:agree", "--max-batch", "32", "--json"]  # fmt: skip
    env = {**os.environ, "EDGEFED_PROFILE_PATH": str(profiles)}
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 1, run.stderr[-3000:]
    reports = json.loads(run.stdout)  # the whole of stdout
    assert [r["profile"] for r in reports] == ["x86-64-generic", "litert-only"]
    assert reports[0]["artifact"] and not reports[0]["error"] and "TFLite export" in reports[1]["error"]
    assert isinstance(reports[0]["variants"][0]["latency_ms"], float)
    assert "python noise" in run.stderr and "fd noise" in run.stderr
    assert json.loads((Path(reports[0]["artifact"]) / "manifest.json").read_text())["max_batch"] == 32


def test_cli_messages_keep_their_brackets(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    missing = tmp_path / "calib[tensorrt].npz"
    result = CliRunner().invoke(app, ["compile", "x.onnx", "-p", "x86-64-generic", "--calib", str(missing), "--val",
                                      str(missing), "--out", str(tmp_path / "out"), "--name", "m", "--version", "1",
                                      "--key", str(keys[0])])  # fmt: skip
    assert result.exit_code == 2
    assert "calib[tensorrt].npz" in result.output.replace("\n", "")
