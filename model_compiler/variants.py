"""Build ONNX variants (fp32, int8 static QDQ), check them against the fp32 reference and time them."""

from __future__ import annotations

import contextlib
import re
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model_compiler.data import Feeds, is_numeric, rows, take


@dataclass(frozen=True)
class GateResult:
    metric: str
    value: float
    tolerance: float
    passed: bool


@dataclass(frozen=True)
class Variant:
    kind: str  # one of KINDS
    path: Path
    size: int
    gate: GateResult
    latency_ms: float

    @property
    def precision(self) -> str:
        return precision_of(self.kind)


def precision_of(kind: str) -> str:
    """'int8-static-per-channel' → 'int8', 'tflite-fp32' → 'fp32'."""
    return kind.removeprefix("tflite-").split("-")[0]


# The back-off ladder for int8, most aggressive first; then fp16 (where the profile runs it), then fp32.
INT8_LADDER = ("int8-static", "int8-static-per-channel", "int8-static-per-channel-excluding-ends")
DYNAMIC_LADDER = ("int8-dynamic", "int8-dynamic-excluding-sensitive")
KINDS = (*INT8_LADDER, *DYNAMIC_LADDER, "fp16", "fp32")
BUILT_IN = ("top1", "cosine", "max_abs")


class _Calibration:
    """ONNX Runtime CalibrationDataReader over named input arrays."""

    def __init__(self, feeds: Feeds, batch: int = 32) -> None:
        total = rows(feeds)
        self._batches: Iterator[Feeds] = iter([take(feeds, i, i + batch) for i in range(0, total, batch)])

    def get_next(self) -> Feeds | None:
        return next(self._batches, None)


def _weighted_nodes(model_path: Path) -> list[str]:
    import onnx

    graph = onnx.load(str(model_path)).graph
    return [n.name for n in graph.node if n.op_type in ("Conv", "MatMul", "Gemm", "ConvTranspose") and n.name]


def quantize_int8_static(fp32: Path, out: Path, calib: Feeds, per_channel: bool = True,
                         exclude_ends: bool = False) -> None:  # fmt: skip
    """Static int8 in QDQ format (QOperator and dynamic int8 measured 3-9x slower on CPU here);
    ``exclude_ends`` keeps the first and last weighted layers in float, usually the most sensitive."""
    fp32, out = fp32.resolve(), out.resolve()
    prepared = out.with_suffix(".pre.onnx")
    with contextlib.chdir(out.parent):  # ONNX Runtime's shape inference drops temporary files in the cwd
        _quantize_static(fp32, prepared, out, calib, per_channel, exclude_ends)


def _quantize_static(fp32: Path, prepared: Path, out: Path, calib: Feeds, per_channel: bool,
                     exclude_ends: bool) -> None:  # fmt: skip
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(fp32), str(prepared))
    except Exception:  # symbolic shape inference gives up on some graphs (transformers): do without it
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    weighted = _weighted_nodes(prepared)
    quantize_static(
        str(prepared), str(out), _Calibration(calib), quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=[weighted[0], weighted[-1]] if exclude_ends and len(weighted) > 2 else [],
    )  # fmt: skip
    prepared.unlink(missing_ok=True)


def quantize_int8_dynamic(fp32: Path, out: Path, exclude: list[str] | None = None) -> None:
    """Dynamic int8 (weights per channel, activations at run time): the fast one for transformers."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), per_channel=True, weight_type=QuantType.QInt8, nodes_to_exclude=exclude or [])


def _role(node: str) -> str:
    """A node's role across repeated blocks: 'layer.3/output/dense/MatMul' → 'layer.N/output/dense/MatMul'."""
    return re.sub(r"\.\d+/", ".N/", node)


def _minimal(fp32: Path, trial: Path, val: Feeds, reference: np.ndarray, metric: str, tolerance: float,
             excluded: list[str]) -> list[str]:  # fmt: skip
    """Quantize again, one at a time, the excluded nodes the gate does not need in float."""
    needed = list(excluded)
    for node in excluded:
        candidate = [n for n in needed if n != node]
        quantize_int8_dynamic(fp32, trial, candidate)
        if gate(metric, tolerance, reference, predict(trial, val)).passed:
            needed = candidate
    return needed


def sensitive_nodes(fp32: Path, work: Path, val: Feeds, reference: np.ndarray, metric: str, tolerance: float,
                    max_roles: int = 2) -> list[str]:  # fmt: skip
    """Measure which weighted nodes hurt most when quantized: group them by role (the same layer in
    every block), try dynamic int8 with each role left in float, and keep the roles whose exclusion
    helps most (greedily, up to ``max_roles``) until the gate passes."""
    roles: dict[str, list[str]] = {}
    for node in _weighted_nodes(fp32):
        roles.setdefault(_role(node), []).append(node)
    excluded: list[str] = []
    for _ in range(max_roles):
        best: tuple[float, str] | None = None
        for role, nodes in roles.items():
            if nodes[0] in excluded:
                continue
            trial = work / "sensitivity.onnx"
            quantize_int8_dynamic(fp32, trial, excluded + nodes)
            value = gate(metric, tolerance, reference, predict(trial, val))
            score = -value.value if metric == "max_abs" else value.value
            if best is None or score > best[0]:
                best = (score, role)
            if value.passed:
                return _minimal(fp32, trial, val, reference, metric, tolerance, excluded + nodes)
        if best is None:
            break
        excluded += roles[best[1]]
    return excluded


def convert_fp16(fp32: Path, out: Path) -> None:
    """fp16 weights and compute, fp32 inputs and outputs (callers keep their dtypes)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), str(out))


def build(kind: str, fp32: Path, out: Path, calib: Feeds, exclude: list[str] | None = None) -> Path:
    """Write the ``kind`` variant of ``fp32`` to ``out`` (fp32 itself is returned as is); ``exclude``:
    nodes a dynamic variant keeps in float."""
    if kind == "fp32":
        return fp32
    if kind == "fp16":
        convert_fp16(fp32, out)
    elif kind.startswith("int8-dynamic"):
        quantize_int8_dynamic(fp32, out, exclude)
    else:
        quantize_int8_static(fp32, out, calib, per_channel=kind != "int8-static", exclude_ends=kind.endswith("ends"))
    return out


def session(path: Path, threads: int = 0) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def predict(path: Path, feeds: Feeds, batch: int = 256) -> np.ndarray:
    """The first output over all rows, ``batch`` rows per run."""
    sess = session(path)
    return np.concatenate([sess.run(None, take(feeds, i, i + batch))[0] for i in range(0, rows(feeds), batch)])


def gate(metric: str, tolerance: float, reference: np.ndarray, candidate: np.ndarray) -> GateResult:
    """top1 (agreement ≥ 1 - tolerance), cosine (min cosine ≥ 1 - tolerance), max_abs (≤ tolerance).
    Outputs that are not float scores (integer labels, strings) are compared row by row for equality:
    top1 and cosine are then the share of equal rows, max_abs the share that differ (see _exact)."""
    ref, cand = reference.reshape(len(reference), -1), candidate.reshape(len(candidate), -1)
    not_scores = reference.dtype.kind != "f"
    if metric in BUILT_IN and not_scores and (metric == "top1" or not is_numeric(reference)):
        return _exact(metric, tolerance, ref, cand)
    if metric == "top1":
        value = float(np.mean(ref.argmax(1) == cand.argmax(1)))
        return GateResult(metric, value, tolerance, value >= 1 - tolerance)
    if metric == "cosine":
        ref, cand = ref.astype(np.float64), cand.astype(np.float64)
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
        value = float(np.min(np.sum(ref * cand, axis=1) / np.maximum(norms, 1e-12)))
        return GateResult(metric, value, tolerance, value >= 1 - tolerance)
    if metric == "max_abs":
        value = float(np.max(np.abs(ref.astype(np.float64) - cand.astype(np.float64))))
        return GateResult(metric, value, tolerance, value <= tolerance)
    if ":" in metric:  # a user metric: fn(reference, candidate) -> score, higher is better, 1.0 = identical
        from model_compiler.sources import load_function

        value = float(load_function(metric)(reference, candidate))
        return GateResult(metric, value, tolerance, value >= 1 - tolerance)
    raise ValueError(f"unknown metric {metric!r}; use top1, cosine, max_abs or file.py:function")


def _exact(metric: str, tolerance: float, ref: np.ndarray, cand: np.ndarray) -> GateResult:
    """Labels (top1) and strings (any metric): top1 and cosine are the share of rows equal to the
    reference, max_abs the share of rows that differ."""
    if ref.shape != cand.shape:
        raise ValueError(f"the variant's output is shaped {list(cand.shape)}, the reference {list(ref.shape)}")
    equal = float(np.mean(np.all(ref == cand, axis=1))) if len(ref) else 1.0
    if metric == "max_abs":
        return GateResult(metric, 1 - equal, tolerance, 1 - equal <= tolerance)
    return GateResult(metric, equal, tolerance, equal >= 1 - tolerance)


def median_latency_ms(path: Path, feed: Feeds, repeats: int = 30, threads: int = 0) -> float:
    """Median wall time of one call on ``feed`` after warm-up."""
    sess = session(path, threads)
    for _ in range(5):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
