"""The compiler: sources (factory, .pt2, .onnx), the accuracy gate and its back-off, bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ROOT

from device_profiles import ProfileError
from model_compiler import CompileOptions, compile_model
from model_compiler.errors import DataError, SourceError

DIGITS = f"{ROOT / 'examples/quickstart/digits.py'}:trained"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import digits

    work = tmp_path_factory.mktemp("compiler")
    digits.train(work, epochs=3)
    os.environ["DIGITS_WEIGHTS"] = str(work / "digits_cnn.pt")
    calib = np.load(work / "calib.npz")["x"]
    _, x_test, _, y_test = digits.digits_split()
    return {"work": work, "calib": (calib, None), "val": (x_test[:200], y_test[:200])}


def compile_to(out: Path, source: str, trained: dict[str, Any], keys: tuple[Path, Path], profiles: list[str],
               **options: Any) -> list[Any]:  # fmt: skip
    opts = CompileOptions(**{"name": "digits", "version": "1.0.0", "key_path": keys[0], "release": 1, **options})
    return compile_model(source, profiles, trained["calib"], trained["val"], out, opts)


def no_leftovers(out: Path) -> bool:
    return not [p for p in out.iterdir() if p.name.startswith(".")] if out.exists() else True


def test_gate_and_back_off_are_recorded(tmp_path: Path, trained: dict[str, Any], keys: tuple[Path, Path]) -> None:
    strict = compile_to(tmp_path / "strict", DIGITS, trained, keys, ["x86-64-generic"], metric="max_abs",
                        tolerance=1e-6)[0]  # fmt: skip
    kinds = [a["kind"] for a in strict.variants]
    assert kinds[:3] == ["int8-static", "int8-static-per-channel", "int8-static-per-channel-excluding-ends"]
    assert all(not a["passed"] and "backing off" in a["note"] for a in strict.variants[:3])
    assert strict.chosen == "fp32"  # nothing quantized survives a 1e-6 max-abs gate: fp32 ships
    manifest = json.loads((Path(strict.artifact) / "manifest.json").read_text())
    assert manifest["precision"] == "fp32" and len(manifest["validation"]["attempts"]) == len(kinds)
    relaxed = compile_to(tmp_path / "relaxed", DIGITS, trained, keys, ["x86-64-generic", "jetson-orin-nano-8gb"])
    assert relaxed[0].variants[0]["kind"] == "int8-static" and relaxed[0].variants[0]["passed"]
    # the fastest passing variant ships (int8 and fp32 time within noise of each other on this CPU)
    fastest = min((a for a in relaxed[0].variants if a["passed"]), key=lambda a: a["latency_ms"])
    assert relaxed[0].chosen == fastest["kind"]
    assert all(a["passed"] for a in relaxed[0].variants if a["kind"] == relaxed[0].chosen)
    jetson = Path(relaxed[1].artifact)
    assert json.loads((jetson / "trt_build.json").read_text())["shapes"]["input"]["max"] == [64, 1, 8, 8]
    assert json.loads((jetson / "manifest.json").read_text())["runtime"] == "tensorrt"


def test_callable_data_and_a_user_metric(tmp_path: Path, trained: dict[str, Any], keys: tuple[Path, Path]) -> None:
    from model_compiler.sources import load_data

    x = trained["val"][0]
    np.save(tmp_path / "val.npy", x)
    source = (
        "import numpy as np\n"
        f"def batches():\n    x = np.load({str(tmp_path / 'val.npy')!r})\n"
        "    return [x[i:i + 50] for i in range(0, len(x), 50)]\n"
        "def agreement(reference, candidate):\n    return float((reference.argmax(1) == candidate.argmax(1)).mean())\n"
    )
    (tmp_path / "data.py").write_text(source)
    data = load_data(f"{tmp_path / 'data.py'}:batches", "val")
    assert isinstance(data[0], np.ndarray) and len(data[0]) == len(x)
    report = compile_to(tmp_path / "out", DIGITS, dict(trained, val=data), keys, ["x86-64-generic"],
                        metric=f"{tmp_path / 'data.py'}:agreement")[0]  # fmt: skip
    assert report.variants[0]["metric"].endswith(":agreement") and report.variants[0]["value"] > 0.9


def test_onnx_and_torch_export_sources(tmp_path: Path, trained: dict[str, Any], keys: tuple[Path, Path]) -> None:
    import digits

    model = digits.trained()
    program = torch.export.export(model, (torch.zeros(2, 1, 8, 8),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))  # fmt: skip
    torch.export.save(program, tmp_path / "digits.pt2")
    from_pt2 = compile_to(tmp_path / "pt2", str(tmp_path / "digits.pt2"), trained, keys, ["x86-64-generic"])[0]
    onnx_file = Path(from_pt2.artifact) / "model.onnx"
    shutil.copy(Path(compile_to(tmp_path / "fp32", DIGITS, trained, keys, ["cloud-gpu"], metric="max_abs",
                                tolerance=1e-6)[0].artifact) / "model.onnx", tmp_path / "digits.onnx")  # fmt: skip
    from_onnx = compile_to(tmp_path / "onnx", str(tmp_path / "digits.onnx"), trained, keys, ["x86-64-generic"])[0]
    assert onnx_file.exists() and Path(from_onnx.artifact, "manifest.json").exists()


def test_bad_input_is_named_and_leaves_nothing(
    tmp_path: Path, trained: dict[str, Any], keys: tuple[Path, Path]
) -> None:
    out = tmp_path / "out"
    broken = tmp_path / "broken.py"
    broken.write_text("def factory():\n    raise RuntimeError('weights missing')\n")
    with pytest.raises(SourceError, match="weights missing"):
        compile_to(out, f"{broken}:factory", trained, keys, ["x86-64-generic"])
    assert no_leftovers(out)
    with pytest.raises(SourceError, match=r"file\.py:"):
        compile_to(out, "no-colon-here", trained, keys, ["x86-64-generic"])
    with pytest.raises(ProfileError, match="unknown profile"):
        compile_to(out, DIGITS, trained, keys, ["pdp-11"])
    wrong = dict(trained, val=(np.zeros((10, 1, 4, 4), np.float32), None))
    with pytest.raises(DataError, match=r"val.*\[10, 1, 4, 4\].*1, 8, 8\]"):
        compile_to(out, DIGITS, wrong, keys, ["x86-64-generic"])
    (tmp_path / "not.onnx").write_bytes(b"garbage")
    with pytest.raises(SourceError, match="not a valid ONNX"):
        compile_to(out, str(tmp_path / "not.onnx"), trained, keys, ["x86-64-generic"])
    assert no_leftovers(out)


def test_one_interface_and_release_across_profiles_and_the_pi_artifact_runs(
    tmp_path: Path, trained: dict[str, Any], keys: tuple[Path, Path]
) -> None:
    from device_profiles import get_profile
    from edge_agent import EdgeClient
    from edge_agent.config import AgentConfig
    from edge_agent.protocol.manifest import manifest_from_wire
    from edge_agent.protocol.signing import TrustStore
    from edge_agent.store import ModelStore

    def manifest(report: Any) -> Any:
        assert not report.error, report.error
        return manifest_from_wire(json.loads((Path(report.artifact) / "manifest.json").read_text()))

    out = tmp_path / "out"  # one call for two profiles, then a third profile later: no --release given
    x86, pi4 = (manifest(r) for r in compile_to(out, DIGITS, trained, keys, ["x86-64-generic", "raspberry-pi-4"],
                                                release=0))  # fmt: skip
    report = compile_to(out, DIGITS, trained, keys, ["raspberry-pi-5"], release=0)[0]
    pi5 = manifest(report)
    assert x86.release == pi4.release == pi5.release > 1
    assert x86.interface == pi4.interface == pi5.interface and not x86.interface.differences(pi5.interface)
    assert [(t.name, t.shape) for t in pi5.inputs] == [("input", ("batch", 1, 8, 8))]  # batch not pinned to 1
    if importlib.util.find_spec("litert_torch") is None:  # no converter: ONNX Runtime, and the report says why
        assert pi5.runtime == "onnxruntime" and "fell back to onnxruntime" in report.warnings[0]
        return
    assert pi5.runtime == "tflite" and report.chosen.startswith("tflite-")
    assert all(a["kind"].startswith("tflite-") for a in report.variants)
    artifact = Path(report.artifact)
    assert (artifact / "model.tflite").exists() and not (artifact / "model.onnx").exists()
    state = tmp_path / "pi-device"
    (state / "trust").mkdir(parents=True)
    shutil.copy(keys[1], state / "trust")
    AgentConfig(device_id="pi", profile="raspberry-pi-5").save(state)
    store = ModelStore(state / "models")
    installed = store.install(artifact, TrustStore.from_dir(state / "trust"), get_profile("raspberry-pi-5"))
    store.activate(installed.name, installed.version)
    x, y = trained["val"]
    with EdgeClient(state, telemetry=False) as client:
        predictions = [
            int(client.infer("digits", {"input": x[i : i + 1]}).outputs["output"].argmax()) for i in range(100)
        ]
        batched = client.infer("digits", {"input": x[:3]}).outputs["output"]  # the runtime splits the batch
    assert np.mean(np.array(predictions) == y[:100]) > 0.8
    assert batched.shape == (3, 10) and list(batched.argmax(1)) == predictions[:3]
