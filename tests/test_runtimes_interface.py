"""The runtimes give callers exactly the manifest's interface, whatever the model file does differently.

Real LiteRT (``ai_edge_litert``) over TFLite files built like converters build them (int32 token ids,
batch baked at 1, their own tensor names), real ONNX Runtime over int16/uint16/uint32/uint64 and string
models. TensorRT needs a GPU: only its pure-Python batch chunking and casting are checked here."""

from __future__ import annotations

import dataclasses
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from tflite_builder import dense_tflite

from edge_agent.errors import InputMismatch
from edge_agent.protocol.artifact import seal
from edge_agent.protocol.manifest import Manifest, TensorSpec, format_time
from edge_agent.protocol.signing import load_private_key
from edge_agent.runtimes import InputValidator, open_runtime
from edge_agent.runtimes.litert import LiteRtSession, load_interpreter_class
from edge_agent.runtimes.tensorrt import TensorRtEngine, max_rows
from edge_agent.runtimes.validation import TensorCast

FEATURES, CLASSES = 4, 3
RNG = np.random.default_rng(7)
WEIGHT = RNG.standard_normal((FEATURES, CLASSES)).astype(np.float32)
BIAS = RNG.standard_normal(CLASSES).astype(np.float32)
CONVERTER_NAMES = ("serving_default_args_0:0", "StatefulPartitionedCall:0")


def tensor(name: str, dtype: str, *shape: int | str) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": list(shape)}


def sealed(directory: Path, key: Path, runtime: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]],
           max_batch: int = 0) -> Manifest:  # fmt: skip
    now = datetime.now(UTC)
    fields = {
        "name": directory.name, "version": "1.0.0", "release": 1, "runtime": runtime, "precision": "fp32",
        "hardware": {"profile": "raspberry-pi-5", "arch": "aarch64", "accelerator": "none"},
        "inputs": inputs, "outputs": outputs, "max_batch": max_batch, "source_sha256": "0" * 64,
        "created_at": format_time(now), "expires_at": format_time(now + timedelta(days=1)),
    }  # fmt: skip
    return seal(directory, fields, load_private_key(key))


def token_model(tmp_path: Path, keys: tuple[Path, Path], **build: Any) -> tuple[Path, Manifest]:
    """The interface the compiler writes (fp32 ONNX's: int64 ids, dynamic batch) over a TFLite file as
    litert-torch writes it (int32 ids, batch fixed at 1, its own names)."""
    directory = tmp_path / "tokens"
    directory.mkdir()
    options = {"batch": 1, "input_dtype": "int32", "names": CONVERTER_NAMES, **build}
    dense_tflite(directory / "model.tflite", WEIGHT, BIAS, **options)
    manifest = sealed(directory, keys[0], "tflite", [tensor("token_ids", "int64", "batch", FEATURES)],
                      [tensor("logits", "float32", "batch", CLASSES)])  # fmt: skip
    return directory, manifest


def reference(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) @ WEIGHT + BIAS


# LiteRT ------------------------------------------------------------------------------------------
def test_the_test_model_really_has_its_batch_baked_at_one(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    directory, _ = token_model(tmp_path, keys)
    interpreter = load_interpreter_class()(model_path=str(directory / "model.tflite"))
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    assert list(detail["shape_signature"]) == [1, FEATURES] and detail["dtype"] == np.int32
    with pytest.raises((RuntimeError, ValueError)):  # resizing is what the runtime must not do
        interpreter.resize_tensor_input(detail["index"], [5, FEATURES])
        interpreter.allocate_tensors()


def test_litert_takes_int64_ids_and_any_batch_on_an_int32_batch_one_model(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    directory, manifest = token_model(tmp_path, keys)
    runtime = open_runtime(directory, manifest)
    assert isinstance(runtime, LiteRtSession)
    x = RNG.integers(-1000, 1000, (5, FEATURES), dtype=np.int64)
    checked = InputValidator(manifest)({"token_ids": x})  # the interface's dtype passes validation as is
    result = runtime.run(checked)
    assert list(result) == ["logits"] and result["logits"].dtype == np.float32
    assert result["logits"].shape == (5, CLASSES)
    np.testing.assert_allclose(result["logits"], reference(x), rtol=1e-5, atol=1e-4)
    rows = [runtime.run({"token_ids": x[i : i + 1]})["logits"] for i in range(5)]
    np.testing.assert_array_equal(result["logits"], np.concatenate(rows))
    assert runtime.run({"token_ids": x[:0]})["logits"].shape == (0, CLASSES)
    np.testing.assert_array_equal(runtime.run({"token_ids": x[:1]})["logits"], rows[0])  # after the batch


def test_litert_refuses_int64_values_that_do_not_fit_int32_by_name(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    directory, manifest = token_model(tmp_path, keys)
    runtime = open_runtime(directory, manifest)
    x = np.zeros((2, FEATURES), np.int64)
    for value in (2**31, -(2**31) - 1):
        x[1, 2] = value
        with pytest.raises(InputMismatch, match=r"input 'token_ids'.*int32"):
            runtime.run({"token_ids": x})
    x[1, 2] = 2**31 - 1  # the largest int32 still fits
    np.testing.assert_allclose(runtime.run({"token_ids": x})["logits"], reference(x), rtol=1e-5)


def test_litert_casts_outputs_back_to_the_interface_and_resizes_dynamic_models(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    directory = tmp_path / "classes"
    directory.mkdir()
    dense_tflite(directory / "model.tflite", WEIGHT, BIAS, output_dtype="int32", names=CONVERTER_NAMES)
    manifest = sealed(directory, keys[0], "tflite", [tensor("image", "float64", "batch", FEATURES)],
                      [tensor("label", "int64", "batch", CLASSES)])  # fmt: skip
    runtime = open_runtime(directory, manifest)
    for batch in (1, 4, 2):  # a dynamic batch: the interpreter's input is resized, never split
        x = RNG.standard_normal((batch, FEATURES)) * 10
        result = runtime.run({"image": x})
        assert list(result) == ["label"] and result["label"].dtype == np.int64
        np.testing.assert_array_equal(result["label"], reference(x).astype(np.int32))


def test_litert_is_safe_under_concurrent_calls_with_mixed_batches(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    directory, manifest = token_model(tmp_path, keys)
    runtime = open_runtime(directory, manifest)
    failures: list[str] = []

    def call(batch: int) -> None:
        for _ in range(20):
            x = RNG.integers(0, 100, (batch, FEATURES), dtype=np.int64)
            if not np.allclose(runtime.run({"token_ids": x})["logits"], reference(x), rtol=1e-5, atol=1e-4):
                failures.append(f"batch {batch}")

    threads = [threading.Thread(target=call, args=(b,)) for b in (1, 3, 1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_litert_refuses_an_interface_with_another_number_of_inputs(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    directory, manifest = token_model(tmp_path, keys)
    extra = TensorSpec("mask", "int64", ("batch", FEATURES))
    with pytest.raises(ValueError, match=r"1 inputs.*lists 2"):
        LiteRtSession(directory, dataclasses.replace(manifest, inputs=(*manifest.inputs, extra)))


# InputValidator ----------------------------------------------------------------------------------
def test_validator_enforces_max_batch_and_equal_rows(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    _, manifest = token_model(tmp_path, keys)
    validator = InputValidator(dataclasses.replace(manifest, max_batch=4))
    validator({"token_ids": np.zeros((4, FEATURES), np.int64)})
    with pytest.raises(InputMismatch, match=r"'token_ids'.*at most 4 rows.*5 rows"):
        validator({"token_ids": np.zeros((5, FEATURES), np.int64)})
    InputValidator(manifest)({"token_ids": np.zeros((500, FEATURES), np.int64)})  # 0: no limit
    with pytest.raises(InputMismatch, match="at most 4 rows"):  # an Interface works as well as a Manifest
        InputValidator(dataclasses.replace(manifest, max_batch=4).interface)({"token_ids": np.zeros((9, 4), np.int64)})
    pair = dataclasses.replace(
        manifest,
        inputs=(TensorSpec("ids", "int64", ("batch", "seq")), TensorSpec("mask", "int64", ("batch", "seq"))),
    )
    validator = InputValidator(pair)
    validator({"ids": np.zeros((2, 7), np.int64), "mask": np.zeros((2, 7), np.int64)})
    with pytest.raises(InputMismatch, match=r"'mask'.*2 rows, like input 'ids'.*3 rows"):
        validator({"ids": np.zeros((2, 7), np.int64), "mask": np.zeros((3, 7), np.int64)})


def test_tensor_cast_checks_the_range_only_when_narrowing() -> None:
    to_int32 = TensorCast.to("ids", np.int32)
    assert to_int32(np.array([1, 2], np.int16)).dtype == np.int32
    assert to_int32(np.array([2**31 - 1], np.uint64)).dtype == np.int32
    with pytest.raises(InputMismatch, match="'ids'"):
        to_int32(np.array([2**31], np.uint64))
    same = np.array([1], np.int32)
    assert to_int32(same) is same
    assert TensorCast.to("x", np.float32)(np.array([0.5])).dtype == np.float32


# ONNX Runtime ------------------------------------------------------------------------------------
NARROW = {"int16": TensorProto.INT16, "uint16": TensorProto.UINT16, "uint32": TensorProto.UINT32,
          "uint64": TensorProto.UINT64}  # fmt: skip


def onnx_artifact(directory: Path, key: Path, graph: onnx.GraphProto, opset: int,
                  inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> Manifest:  # fmt: skip
    directory.mkdir()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(directory / "model.onnx"))
    return sealed(directory, key, "onnxruntime", inputs, outputs)


def test_onnxruntime_runs_int16_uint16_uint32_uint64(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    nodes = [helper.make_node("Identity", [f"in_{k}"], [f"out_{k}"]) for k in NARROW]
    nodes.append(helper.make_node("Cast", ["in_uint32"], ["as_float"], to=TensorProto.FLOAT))
    graph = helper.make_graph(
        nodes,
        "narrow",
        [helper.make_tensor_value_info(f"in_{k}", t, ["batch", 3]) for k, t in NARROW.items()],
        [helper.make_tensor_value_info(f"out_{k}", t, ["batch", 3]) for k, t in NARROW.items()]
        + [helper.make_tensor_value_info("as_float", TensorProto.FLOAT, ["batch", 3])],
    )
    manifest = onnx_artifact(
        tmp_path / "narrow", keys[0], graph, 17,
        [tensor(f"in_{k}", k, "batch", 3) for k in NARROW],
        [tensor(f"out_{k}", k, "batch", 3) for k in NARROW] + [tensor("as_float", "float32", "batch", 3)],
    )  # fmt: skip
    feeds = {f"in_{k}": np.array([[0, 1, np.iinfo(k).max], [np.iinfo(k).min, 2, 3]], k) for k in NARROW}
    checked = InputValidator(manifest)(feeds)
    outputs = open_runtime(tmp_path / "narrow", manifest).run(checked)
    for kind in NARROW:
        assert outputs[f"out_{kind}"].dtype == np.dtype(kind)
        np.testing.assert_array_equal(outputs[f"out_{kind}"], feeds[f"in_{kind}"])
    np.testing.assert_array_equal(outputs["as_float"], feeds["in_uint32"].astype(np.float32))
    with pytest.raises(InputMismatch, match="'in_uint16'"):
        InputValidator(manifest)({**feeds, "in_uint16": feeds["in_uint16"].astype(np.int32)})


def string_artifact(tmp_path: Path, keys: tuple[Path, Path]) -> tuple[Path, Manifest]:
    wanted = helper.make_tensor("wanted", TensorProto.STRING, [], [b"edge"])
    nodes = [helper.make_node("Identity", ["text"], ["same"]),
             helper.make_node("Constant", [], ["wanted"], value=wanted),
             helper.make_node("Equal", ["text", "wanted"], ["is_edge"])]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "strings",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch"])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, ["batch"]),
         helper.make_tensor_value_info("is_edge", TensorProto.BOOL, ["batch"])],
    )  # fmt: skip
    manifest = onnx_artifact(tmp_path / "strings", keys[0], graph, 19, [tensor("text", "bytes", "batch")],
                             [tensor("same", "bytes", "batch"), tensor("is_edge", "bool", "batch")])  # fmt: skip
    return tmp_path / "strings", manifest


@pytest.mark.parametrize(
    "text",
    [
        np.array([b"edge", b"Fed", "\u00e9t\u00e9".encode()], dtype=object),
        np.array(["edge", "Fed", "\u00e9t\u00e9"], dtype=object),
        np.array(["edge", "Fed", "\u00e9t\u00e9"]),
        np.array([b"edge", b"Fed", "\u00e9t\u00e9".encode()]),  # |S: ORT would read it as garbage
    ],
    ids=["bytes-objects", "str-objects", "unicode-array", "bytes-array"],
)
def test_onnxruntime_runs_string_models_with_bytes_or_str(
    tmp_path: Path, keys: tuple[Path, Path], text: np.ndarray
) -> None:
    directory, manifest = string_artifact(tmp_path, keys)
    outputs = open_runtime(directory, manifest).run({"text": text})
    assert list(outputs["same"]) == [b"edge", b"Fed", "\u00e9t\u00e9".encode()]  # BYTES, as the cloud route
    assert outputs["same"].dtype == object
    np.testing.assert_array_equal(outputs["is_edge"], [True, False, False])


def test_onnxruntime_refuses_bytes_that_are_not_utf8_by_name(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    directory, manifest = string_artifact(tmp_path, keys)
    text = np.array([b"edge", b"\xff\xfe"], dtype=object)
    InputValidator(manifest)({"text": text})  # the dtype is right; the content is what ONNX cannot take
    with pytest.raises(InputMismatch, match=r"'text'.*UTF-8.*element 1"):
        open_runtime(directory, manifest).run({"text": text})


# TensorRT (no GPU here: the chunking and casts around the engine, with a stand-in execution) ------
def test_tensorrt_max_rows_comes_from_the_profile_or_a_static_batch() -> None:
    specs = (TensorSpec("ids", "int64", ("batch", 8)), TensorSpec("scale", "float32", (1,)))
    assert max_rows(specs, {"ids": {"min": [1, 8], "opt": [4, 8], "max": [16, 8]}}, {"ids": -1}) == 16
    assert max_rows(specs, {}, {"ids": 1, "scale": 1}) == 1
    assert max_rows(specs, {}, {"ids": -1}) == 0


def test_tensorrt_splits_batches_over_the_profile_max_and_casts_ids() -> None:
    engine = object.__new__(TensorRtEngine)
    engine.output_names = ["logits"]
    engine.max_rows = 4
    engine._casts = {"ids": TensorCast.to("ids", np.int32)}
    engine._batched = ("ids",)
    engine._output_dtypes = {"logits": np.dtype(np.float32)}
    engine._lock = threading.Lock()
    seen: list[tuple[tuple[int, ...], np.dtype[Any]]] = []

    def execute(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = inputs["ids"]
        assert ids.shape[0] <= 4
        seen.append((ids.shape, ids.dtype))
        return {"logits": ids.sum(axis=1, keepdims=True).astype(np.float16)}

    engine._execute = execute  # type: ignore[method-assign]
    ids = np.arange(30, dtype=np.int64).reshape(10, 3)
    result = engine.run({"ids": ids})
    assert [shape for shape, _ in seen] == [(4, 3), (4, 3), (2, 3)] and {d for _, d in seen} == {np.dtype(np.int32)}
    assert result["logits"].dtype == np.float32
    np.testing.assert_array_equal(result["logits"], ids.sum(axis=1, keepdims=True))
    with pytest.raises(InputMismatch, match="'ids'"):
        engine.run({"ids": np.full((2, 3), 2**40, np.int64)})
