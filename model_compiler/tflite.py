"""TFLite variants for profiles that prefer LiteRT: converted from the PyTorch module by litert-torch,
int8 by ai-edge-quantizer (weights int8, activations float), run and timed in the LiteRT interpreter.

Both converters come with the ``tflite-export`` extra (about 2 GB with jax); the device side needs
only ``ai-edge-litert`` (extra ``tflite``).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from model_compiler.data import Feeds, rows, take
from model_compiler.errors import SourceError
from model_compiler.sources import load_factory

TFLITE_KINDS = ("tflite-int8", "tflite-fp32")


def export_tflite(source: str, example: Feeds, out: Path) -> None:
    """fp32 TFLite from a PyTorch factory source (litert-torch)."""
    if source.endswith((".onnx", ".pt2")):
        raise SourceError(f"TFLite export needs a PyTorch factory source (file.py:factory), not {source}")
    try:
        import litert_torch
        import torch
    except ImportError:
        raise SourceError("TFLite export needs litert-torch: pip install 'edgefed[tflite-export]'") from None
    module = load_factory(source).eval()
    samples = tuple(torch.from_numpy(np.ascontiguousarray(a[:1])) for a in example.values())
    try:
        litert_torch.convert(module, samples).export(str(out))
    except Exception as exc:
        raise SourceError(f"TFLite conversion failed: {exc}; the model may use an op LiteRT cannot run") from exc


def quantize_tflite(fp32: Path, out: Path) -> None:
    """Weights int8 (per channel), activations float: the LiteRT recipe that keeps accuracy on CPUs."""
    from ai_edge_quantizer import quantizer, recipe

    job = quantizer.Quantizer(str(fp32))
    job.load_quantization_recipe(recipe.dynamic_wi8_afp32())
    job.quantize().export_model(str(out), overwrite=True)


def _interpreter(path: Path, threads: int | None = None) -> Any:
    from edge_agent.runtimes.litert import load_interpreter_class

    interpreter = load_interpreter_class()(model_path=str(path), num_threads=threads)
    interpreter.allocate_tensors()
    return interpreter


def _run(interpreter: Any, feeds: Feeds) -> np.ndarray:
    """One call, mapped as the edge runtime maps it: the data's inputs to the interpreter's in declared
    order, an input the converter narrowed (int64 token ids → int32) cast, the first output returned."""
    details = interpreter.get_input_details()
    arrays = list(feeds.values())
    if any(tuple(d["shape"]) != a.shape for d, a in zip(details, arrays, strict=True)):
        for detail, array in zip(details, arrays, strict=True):
            interpreter.resize_tensor_input(detail["index"], list(array.shape))
        interpreter.allocate_tensors()
        details = interpreter.get_input_details()
    for detail, array in zip(details, arrays, strict=True):
        interpreter.set_tensor(detail["index"], array.astype(detail["dtype"], copy=False))
    interpreter.invoke()
    return np.array(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))


def predict_tflite(path: Path, feeds: Feeds) -> np.ndarray:
    """Row by row: the converter bakes the example's batch of 1 into reshapes, so a TFLite model takes
    batch 1; the manifest still carries the version's interface (batch dynamic), and the edge LiteRT
    runtime splits a batch into rows the same way."""
    interpreter = _interpreter(path)
    return np.concatenate([_run(interpreter, take(feeds, i, i + 1)) for i in range(rows(feeds))])


def latency_tflite_ms(path: Path, feed: Feeds, repeats: int = 30) -> float:
    """Median latency of one call on the first row of ``feed`` (batch 1, see predict_tflite)."""
    feed = take(feed, 0, 1)
    interpreter = _interpreter(path)
    for _ in range(5):
        _run(interpreter, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _run(interpreter, feed)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
