"""Golden samples: the contract between the compiler that writes them and the agent that checks them.

An artifact may carry ``golden.npz`` (a plain NumPy archive, no pickles; signed like every payload file
through its sha256 in the manifest) holding a few validation rows, ``input/NAME`` per model input, and
the fp32 reference's output on them, ``expected/NAME`` (the first output: the one the accuracy gate
compares). The manifest's ``validation.golden`` says how to check them:

    {"file": "golden.npz", "rows": 8, "output": "output", "metric": "top1", "measured": 1.0,
     "limit": 0.875, "classes": 8}

``metric`` is the gate's metric where the device can compute it (``top1``, ``cosine``, ``max_abs``),
``exact`` for outputs that are not float scores (labels, strings) and ``cosine`` in place of a user
metric; ``measured`` is what the compiler measured for the shipped variant on these rows, ``limit``
what the device must reach (``max_abs``: at most; the others: at least), from ``golden_limit``.
Compiler and agent compare with the same ``golden_value``, so the check admits what the compiler saw.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

GOLDEN_FILE = "golden.npz"
GOLDEN_ROWS = 8
METRICS = ("top1", "cosine", "max_abs", "exact")
ERROR_FACTOR = 2.0  # the device may be off by twice the compiler's measured error (another CPU, ORT, engine)
RELATIVE_FLOOR = 1e-3  # ... plus this much of the output's scale (max |expected|, at least 1) for max_abs
COSINE_FLOOR = 1e-4  # ... plus this much cosine distance
MARGIN_ROWS = 1  # row-counting metrics (top1, exact) admit one more disagreeing row when there are >= 4


def golden_metric(gate_metric: str, expected: np.ndarray) -> str:
    """The metric the device checks: the gate's where it can compute it."""
    if expected.dtype.kind != "f":
        return "exact"
    return gate_metric if gate_metric in ("top1", "cosine", "max_abs") else "cosine"


def golden_value(metric: str, expected: np.ndarray, actual: np.ndarray) -> float:
    """top1 and exact: the share of rows that agree (argmax / every element equal); cosine: the lowest
    row cosine; max_abs: the largest absolute difference. Raises ValueError when shapes differ."""
    if expected.shape != actual.shape:
        raise ValueError(f"output shaped {list(actual.shape)}, expected {list(expected.shape)}")
    if expected.dtype.kind in "OSU" or actual.dtype.kind in "OSU":  # text: compared as str
        expected, actual = storable(expected), storable(actual)
    rows = max(len(expected), 1)
    ref, got = expected.reshape(rows, -1), actual.reshape(rows, -1)
    if metric == "exact":
        return float(np.mean(np.all(ref == got, axis=1)))
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    if metric == "top1":
        return float(np.mean(ref64.argmax(1) == got64.argmax(1)))
    if metric == "cosine":
        norms = np.linalg.norm(ref64, axis=1) * np.linalg.norm(got64, axis=1)
        cosines = np.sum(ref64 * got64, axis=1) / np.maximum(norms, 1e-12)
        return float(np.min(np.nan_to_num(cosines, nan=-1.0)))
    if metric == "max_abs":
        return float(np.nan_to_num(np.max(np.abs(ref64 - got64)), nan=np.inf))
    raise ValueError(f"unknown golden metric {metric!r}; one of {', '.join(METRICS)}")


def golden_limit(metric: str, expected: np.ndarray, measured: float) -> float:
    """What the device must reach, from what the compiler measured on the same rows: row-counting
    metrics admit ``MARGIN_ROWS`` more disagreeing rows (with 4 rows or more); cosine and max_abs admit
    ``ERROR_FACTOR`` times the measured error plus a small floor."""
    if metric in ("top1", "exact"):
        rows = len(expected)
        margin = MARGIN_ROWS if rows >= 4 else 0
        return max(0.0, (round(measured * rows) - margin) / rows) if rows else 0.0
    if metric == "cosine":
        return 1.0 - (ERROR_FACTOR * (1.0 - measured) + COSINE_FLOOR)
    scale = max(1.0, float(np.max(np.abs(expected.astype(np.float64))))) if expected.size else 1.0
    return ERROR_FACTOR * measured + RELATIVE_FLOOR * scale


def golden_passes(metric: str, value: float, limit: float) -> bool:
    return value <= limit if metric == "max_abs" else value >= limit


def storable(array: np.ndarray) -> np.ndarray:
    """``array`` as NumPy can save without pickles: numbers as they are, text (str/bytes objects, UTF-8)
    as a unicode array. Raises ValueError for anything else."""
    if array.dtype.kind in "biufU":
        return array
    if array.dtype.kind in "OS":
        values = [v.decode() if isinstance(v, bytes) else v for v in array.reshape(-1)]
        if not all(isinstance(v, str) for v in values):
            raise ValueError("only numbers and text can be golden samples")
        return np.array(values, dtype=str).reshape(array.shape)
    raise ValueError(f"{array.dtype} cannot be a golden sample")


def as_text_objects(array: np.ndarray) -> np.ndarray:
    """A unicode array as the object array of str the runtimes take for BYTES tensors."""
    result = np.empty(array.size, dtype=object)
    result[:] = [str(v) for v in array.reshape(-1)]
    return result.reshape(array.shape)


def encode_golden(inputs: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> bytes:
    """The bytes of ``golden.npz``."""
    arrays = {f"input/{k}": storable(v) for k, v in inputs.items()}
    arrays |= {f"expected/{k}": storable(v) for k, v in expected.items()}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def decode_golden(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Inputs and expected outputs by name; ValueError when the file is not a golden archive."""
    inputs: dict[str, np.ndarray] = {}
    expected: dict[str, np.ndarray] = {}
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        for key in archive.files:
            kind, _, name = key.partition("/")
            if kind not in ("input", "expected") or not name:
                raise ValueError(f"unexpected entry {key!r}")
            (inputs if kind == "input" else expected)[name] = archive[key]
    return inputs, expected


def check_spec(spec: Any) -> dict[str, Any]:
    """``validation.golden`` with the fields the agent needs; ValueError naming what is wrong."""
    if not isinstance(spec, dict):
        raise ValueError("validation.golden is not an object")
    wanted: dict[str, Any] = {"file": str, "output": str, "metric": str, "limit": (int, float), "rows": int}
    for key, types in wanted.items():
        if not isinstance(spec.get(key), types) or isinstance(spec.get(key), bool):
            raise ValueError(f"validation.golden.{key} is missing or of the wrong type")
    if spec["metric"] not in METRICS:
        raise ValueError(f"validation.golden.metric {spec['metric']!r} is not one of {', '.join(METRICS)}")
    return spec


def golden_entry(gate_metric: str, expected: np.ndarray, actual: np.ndarray, output: str,
                 classes: int | None = None) -> dict[str, Any]:  # fmt: skip
    """The manifest's ``validation.golden`` for rows whose fp32 output is ``expected`` and the shipped
    variant's is ``actual``."""
    metric = golden_metric(gate_metric, expected)
    measured = golden_value(metric, expected, actual)
    entry: dict[str, Any] = {"file": GOLDEN_FILE, "rows": len(expected), "output": output, "metric": metric,
                             "measured": measured, "limit": golden_limit(metric, expected, measured)}  # fmt: skip
    if classes is not None:
        entry["classes"] = classes
    return entry
