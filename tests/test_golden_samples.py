"""Golden samples checked before activation (issue 13, agent-side safety): the compiler stores a few
validation rows with the fp32 reference's outputs and a tolerance measured on the shipped variant; the
agent runs them through the real runtime after warming it and refuses to activate a version that
misses, keeping the previous version active and serving."""

from __future__ import annotations

import json
import shutil
import signal
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import add_golden, gemm_onnx, make_artifact, wait_for
from onnx import TensorProto, helper, numpy_helper
from test_install_convergence import agent_process, deployed_over_v1, online, reported

from cloud_hub.server import Hub
from device_profiles import get_profile
from edge_agent.agent import health_check
from edge_agent.client import EdgeClient
from edge_agent.golden import GoldenSamplesFailed, check_golden
from edge_agent.protocol.artifact import MANIFEST_FILE, seal
from edge_agent.protocol.errors import ArtifactRejected
from edge_agent.protocol.golden import GOLDEN_FILE, decode_golden, golden_limit, golden_value
from edge_agent.protocol.signing import TrustStore, load_private_key
from edge_agent.runtimes import open_runtime
from edge_agent.store import ModelStore
from model_compiler.golden import pick_rows, write_golden

PROFILE = get_profile("x86-64-generic")
ROOT = Path(__file__).resolve().parents[1]


def resealed(directory: Path, key: Path, validation: dict[str, Any] | None = None) -> Path:
    """Sign ``directory`` again as it now is (a validly signed artifact), optionally with new validation."""
    fields = json.loads((directory / MANIFEST_FILE).read_bytes())
    for derived in ("files", "chunk_size", "schema"):
        fields.pop(derived)
    if validation is not None:
        fields["validation"] = validation
    seal(directory, fields, load_private_key(key), chunk_size=1024)
    return directory


def swapped_artifact(directory: Path, key: Path, **options: Any) -> Path:
    """Golden samples of one Gemm, model.onnx then swapped for another (seed 5) and signed again."""
    make_artifact(directory, key, golden=True, **options)
    gemm_onnx(directory / "model.onnx", seed=5)
    return resealed(directory, key)


def raising_artifact(directory: Path, key: Path, **options: Any) -> Path:
    """Golden samples of a Gemm whose model then also Gathers at index int(max of the row) from a
    2-element table: zero input runs, rows whose largest value is 2 or more raise (about half)."""
    make_artifact(directory, key, golden=True, **options)
    model = onnx.load(str(directory / "model.onnx"))
    graph = model.graph
    graph.node[0].output[0] = "scores"
    graph.initializer.append(numpy_helper.from_array(np.zeros(2, np.float32), "table"))
    graph.node.extend([
        helper.make_node("ReduceMax", ["input"], ["row_max"], axes=[1], keepdims=1),
        helper.make_node("Cast", ["row_max"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "index"], ["zero"]),
        helper.make_node("Add", ["scores", "zero"], ["output"]),
    ])  # fmt: skip
    onnx.save(model, str(directory / "model.onnx"))
    return resealed(directory, key)


def install_checked(store: ModelStore, trust: TrustStore, artifact: Path) -> Any:
    return store.install(artifact, trust, PROFILE, activate=True, check=partial(health_check, profile=PROFILE))


# the compiler ------------------------------------------------------------------------------------
def test_a_compiled_artifact_carries_golden_samples_that_pass(
    digits_artifact: dict[str, Any], device: tuple[Path, ModelStore, TrustStore]
) -> None:
    _, store, trust = device
    artifact = digits_artifact["path"]
    manifest = json.loads((artifact / MANIFEST_FILE).read_bytes())
    golden = manifest["validation"]["golden"]
    assert golden["file"] == GOLDEN_FILE and GOLDEN_FILE in [f["path"] for f in manifest["files"]]  # signed
    assert golden["rows"] == 8 and golden["classes"] == 8 and golden["metric"] == "top1"  # the gate's metric
    assert golden["measured"] >= golden["limit"] and golden["limit"] == (round(golden["measured"] * 8) - 1) / 8
    inputs, expected = decode_golden((artifact / GOLDEN_FILE).read_bytes())  # no pickles (allow_pickle=False)
    assert inputs["input"].shape == (8, 1, 8, 8) and expected["output"].shape == (8, 10)
    rows = [int(np.flatnonzero((digits_artifact["x"] == row).all(axis=(1, 2, 3)))[0]) for row in inputs["input"]]
    assert len(set(digits_artifact["y"][rows].tolist())) == 8  # eight validation rows of eight classes
    installed = install_checked(store, trust, artifact)
    directory = store.version_dir(installed.name, installed.version)
    value = check_golden(directory, installed, open_runtime(directory, installed, PROFILE))
    assert value is not None and value >= golden["limit"]


def test_a_tflite_artifact_passes_its_golden_samples_on_litert(
    digits_artifact: dict[str, Any], tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    """Measured by the compiler with its TFLite predictor, checked by the agent's LiteRT runtime."""
    pytest.importorskip("litert_torch")
    from model_compiler import CompileOptions, compile_model

    x, y = digits_artifact["x"], digits_artifact["y"]
    options = CompileOptions(name="digits-cnn", version="1.0.0", key_path=keys[0], release=1, metric="cosine")
    source = f"{ROOT / 'examples/quickstart/digits.py'}:trained"
    (report,) = compile_model(source, ["raspberry-pi-5"], (x[:64], None), (x, y), tmp_path / "out", options)
    assert not report.error and report.runtime == "tflite", report
    pi = get_profile("raspberry-pi-5")
    store = ModelStore(tmp_path / "store")
    installed = store.install(Path(report.artifact), TrustStore.from_dir(keys[1].parent), pi, activate=True,
                              check=partial(health_check, profile=pi))  # fmt: skip
    golden = installed.validation["golden"]
    assert golden["metric"] == "cosine" and golden["measured"] >= golden["limit"] > 0.99
    active = store.active("digits-cnn")
    assert active is not None and active.artifact_id == installed.artifact_id


def test_rows_are_the_most_confident_of_as_many_classes_as_there_are_rows() -> None:
    scores = np.array([[5, 0, 0], [9, 0, 0], [0, 3, 0], [0, 8, 0], [0, 0, 1], [7, 0, 0]], np.float32)
    assert pick_rows(scores, None, 3).tolist() == [1, 3, 4]
    assert pick_rows(scores, np.array([0, 0, 0, 0, 0, 1]), 2).tolist() == [1, 5]  # labels win over the model
    assert pick_rows(np.zeros((5, 4), np.float32), None, 8).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("metric", ["top1", "cosine", "max_abs"])
def test_int8_variants_pass_within_their_measured_tolerance(
    metric: str, digits_artifact: dict[str, Any], tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    """Every int8 variant the compiler may ship, gated with each built-in metric: the tolerance admits
    what the compiler measured on the device's real runtime, and is far tighter than another model."""
    from model_compiler.data import as_feeds
    from model_compiler.sources import export_source
    from model_compiler.variants import build, predict, session

    x, y = digits_artifact["x"], digits_artifact["y"]
    fp32 = tmp_path / "fp32.onnx"
    export_source(f"{ROOT / 'examples/quickstart/digits.py'}:trained", x[:64], fp32)
    feeds = as_feeds(x, session(fp32), "val")
    reference = predict(fp32, feeds)
    trust = TrustStore.from_dir(keys[1].parent)
    for kind in ("int8-static", "int8-static-per-channel", "int8-dynamic"):
        model = build(kind, fp32, tmp_path / f"{kind}.onnx", feeds)
        directory = shutil.copytree(digits_artifact["path"], tmp_path / f"{kind}-{metric}")
        shutil.copyfile(model, directory / "model.onnx")
        (directory / GOLDEN_FILE).unlink()
        golden = write_golden(directory, feeds, reference, y, "output", metric, partial(predict, model))
        assert golden is not None and golden["metric"] == metric
        if metric != "top1":
            assert golden["measured"] != (1.0 if metric == "cosine" else 0.0), "int8 should differ from fp32"
        _, expected = decode_golden((directory / GOLDEN_FILE).read_bytes())
        if metric == "max_abs":  # an fp32 model's tolerance (measured 0) would refuse this int8 model
            assert golden["measured"] > golden_limit(metric, expected["output"], 0.0)
        store = ModelStore(tmp_path / f"store-{kind}-{metric}")
        installed = install_checked(store, trust, resealed(directory, keys[0], {"golden": golden}))
        active = store.active("digits-cnn")
        assert active is not None and active.artifact_id == installed.artifact_id, kind
        other = np.random.default_rng(0).standard_normal((8, 10)).astype(np.float32)  # another model's scores
        wrong = golden_value(metric, expected["output"], other)
        assert wrong < golden["limit"] if metric != "max_abs" else wrong > golden["limit"]


def test_the_tolerance_admits_the_measured_error_and_little_more() -> None:
    expected = np.array([[1.0, 0.0], [0.0, 4.0]])
    assert golden_limit("max_abs", expected, 0.1) == pytest.approx(0.2 + 0.004)
    assert golden_limit("cosine", expected, 0.99) == pytest.approx(1 - 0.0201)
    eight = np.zeros((8, 3))
    assert golden_limit("top1", eight, 1.0) == 7 / 8 and golden_limit("exact", eight, 6 / 8) == 5 / 8
    assert golden_limit("top1", eight[:3], 1.0) == 1.0  # no margin on fewer than 4 rows


# the agent ----------------------------------------------------------------------------------------
def test_a_swapped_model_fails_the_golden_check_and_the_previous_version_stays_active(
    tmp_path: Path, keys: tuple[Path, Path], device: tuple[Path, ModelStore, TrustStore]
) -> None:
    state, store, trust = device
    v1 = install_checked(store, trust, make_artifact(tmp_path / "v1", keys[0], golden=True))
    v2 = swapped_artifact(tmp_path / "v2", keys[0], version="2.0.0", release=2)
    with pytest.raises(GoldenSamplesFailed, match=r"^golden samples: \d of 8 rows have the expected top-1") as caught:
        install_checked(store, trust, v2)
    assert isinstance(caught.value, ArtifactRejected) and caught.value.reason == "golden"
    active = store.active("gemm")
    assert active is not None and active.artifact_id == v1.artifact_id
    x = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)
    with EdgeClient(state, telemetry=False) as client:
        result = client.infer("gemm", {"input": x})
    assert result.version == "1.0.0" and result.route == "local"


def test_a_model_that_raises_on_some_inputs_fails_the_golden_check(
    tmp_path: Path, keys: tuple[Path, Path], device: tuple[Path, ModelStore, TrustStore]
) -> None:
    _, store, trust = device
    install_checked(store, trust, make_artifact(tmp_path / "v1", keys[0]))
    v2 = raising_artifact(tmp_path / "v2", keys[0], version="2.0.0", release=2)
    with pytest.raises(GoldenSamplesFailed, match=r"the model raised on [1-7] of 8 rows \(\d") as caught:
        install_checked(store, trust, v2)  # the zero-input warm-up passes: only the golden rows raise
    assert "Gather" in str(caught.value) or "indices" in str(caught.value)
    active = store.active("gemm")
    assert active is not None and active.version == "1.0.0"


def test_an_artifact_without_golden_samples_still_installs(
    tmp_path: Path, keys: tuple[Path, Path], device: tuple[Path, ModelStore, TrustStore]
) -> None:
    _, store, trust = device
    older = make_artifact(tmp_path / "older", keys[0])  # as compilers before golden samples wrote them
    assert "golden" not in json.loads((older / MANIFEST_FILE).read_bytes()).get("validation", {})
    installed = install_checked(store, trust, older)
    directory = store.version_dir("gemm", "1.0.0")
    assert check_golden(directory, installed, open_runtime(directory, installed, PROFILE)) is None
    active = store.active("gemm")
    assert active is not None and active.artifact_id == installed.artifact_id


def test_golden_samples_outside_the_signed_files_are_refused(
    tmp_path: Path, keys: tuple[Path, Path], device: tuple[Path, ModelStore, TrustStore]
) -> None:
    _, store, trust = device
    artifact = make_artifact(tmp_path / "a", keys[0])
    golden = add_golden(artifact)
    resealed(artifact, keys[0], {"golden": {**golden, "file": "elsewhere.npz"}})
    with pytest.raises(GoldenSamplesFailed, match=r"elsewhere\.npz is not among the artifact's signed files"):
        install_checked(store, trust, artifact)
    assert store.active("gemm") is None


def test_the_agent_reports_a_golden_failure_and_keeps_serving_the_previous_version(
    hub: Hub, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    v2 = swapped_artifact(tmp_path / "v2", keys[0], version="2.0.0", release=2)
    state, store = deployed_over_v1(hub, tmp_path, keys, v2)
    agent = agent_process(state)
    try:
        wait_for("device online", lambda: online(hub))
        assert hub.control is not None
        hub.control.deploy("gemm", "2.0.0", "device:dev-1")
        wait_for("a final state", lambda: reported(hub).get("version") == "2.0.0"
                 and reported(hub).get("state") in ("active", "failed"))  # fmt: skip
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=20)
    assert reported(hub)["state"] == "failed", reported(hub)
    assert reported(hub)["error"].startswith("golden samples: "), reported(hub)
    active = store.active("gemm")
    assert active is not None and active.version == "1.0.0"
    with EdgeClient(state, telemetry=False) as client:
        assert client.infer("gemm", {"input": np.zeros((1, 32), np.float32)}).version == "1.0.0"
