"""LiteRT / TFLite: ``ai_edge_litert`` when installed, else ``tflite_runtime``.

Callers see the manifest's interface, whatever the ``.tflite`` file does differently:

- **names**: converters name tensors their own way (``serving_default_args_0``), so interface inputs
  and outputs map to the interpreter's by name when every name matches, else by declared order;
- **dtypes**: each input is cast to the interpreter tensor's dtype (int64 token ids → int32 only when
  every value fits, else ``ValueError`` naming the input), and each output back to the interface's;
- **batch**: a model whose input has a static batch of 1 (converters bake the example's batch into
  reshapes) runs a call of N rows row by row and concatenates the outputs; any other shape change
  resizes the interpreter's input.

An interpreter is not thread-safe, so calls are serialised by a lock (casts happen before it)."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_profiles import DeviceProfile
from edge_agent.protocol.manifest import Manifest, TensorSpec
from edge_agent.runtimes.validation import TensorCast, numpy_dtype


def load_interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise ImportError("TFLite artifacts need LiteRT: pip install 'edgefed[tflite]'") from None
    return Interpreter


@dataclass(frozen=True)
class _Input:
    """How one interface input reaches its interpreter tensor (planned once, at load)."""

    name: str
    index: int
    cast: TensorCast  # to the interpreter tensor's dtype
    batch_one: bool  # static batch of 1: a call with more rows runs row by row


@dataclass(frozen=True)
class _Output:
    name: str
    index: int
    dtype: np.dtype[Any] | None  # the interface's, when the interpreter's differs
    empty: np.ndarray  # what a call with no rows returns (before the cast)


def _bind(specs: Sequence[TensorSpec], details: list[dict[str, Any]], role: str) -> list[tuple[TensorSpec, Any]]:
    """Interface tensors with the interpreter's: by name when every name matches, else by order."""
    if len(specs) != len(details):
        raise ValueError(
            f"the TFLite model has {len(details)} {role}s {[d['name'] for d in details]} but the manifest's "
            f"interface lists {len(specs)} {[s.name for s in specs]}"
        )
    by_name = {d["name"]: d for d in details}
    if all(s.name in by_name for s in specs):
        return [(s, by_name[s.name]) for s in specs]
    return list(zip(specs, details, strict=True))


def _plan_input(spec: TensorSpec, detail: dict[str, Any]) -> _Input:
    signature = detail.get("shape_signature", detail["shape"])
    dynamic = bool(spec.shape) and not isinstance(spec.shape[0], int)  # the interface lets the batch vary
    batch_one = dynamic and len(signature) > 0 and int(signature[0]) == 1
    return _Input(spec.name, int(detail["index"]), TensorCast.to(spec.name, detail["dtype"]), batch_one)


def _plan_output(spec: TensorSpec, detail: dict[str, Any]) -> _Output:
    wanted = numpy_dtype(spec.dtype)
    empty = np.empty((0, *(int(d) for d in detail["shape"][1:])), detail["dtype"])
    return _Output(spec.name, int(detail["index"]), None if wanted == detail["dtype"] else wanted, empty)


class LiteRtSession:
    def __init__(self, directory: Path, manifest: Manifest, profile: DeviceProfile | None = None) -> None:
        self.manifest = manifest
        threads = min(profile.cpu_cores, os.cpu_count() or 1) if profile else None
        self.interpreter = load_interpreter_class()(model_path=str(directory / "model.tflite"), num_threads=threads)
        self.interpreter.allocate_tensors()
        self._lock = threading.Lock()
        inputs = _bind(manifest.inputs, self.interpreter.get_input_details(), "input")
        outputs = _bind(manifest.outputs, self.interpreter.get_output_details(), "output")
        self._inputs = tuple(_plan_input(s, d) for s, d in inputs)
        self._outputs = tuple(_plan_output(s, d) for s, d in outputs)
        self._shapes: list[tuple[int, ...] | None] = [tuple(int(x) for x in d["shape"]) for _, d in inputs]
        self._split = any(p.batch_one for p in self._inputs)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = [p.cast(inputs[p.name]) for p in self._inputs]
        rows = self._rows(arrays) if self._split else 1
        with self._lock:
            results = self._invoke(arrays) if rows == 1 else self._row_by_row(arrays, rows)
        return {
            o.name: r if o.dtype is None else r.astype(o.dtype) for o, r in zip(self._outputs, results, strict=True)
        }

    def _rows(self, arrays: list[np.ndarray]) -> int:
        rows = {a.shape[0] for p, a in zip(self._inputs, arrays, strict=True) if p.batch_one and a.ndim}
        if len(rows) > 1:
            raise ValueError(f"inputs carry different numbers of rows {sorted(rows)}; one call is one batch")
        return rows.pop() if rows else 1

    def _row_by_row(self, arrays: list[np.ndarray], rows: int) -> list[np.ndarray]:
        """A batch-1 model: one invocation per row, outputs concatenated along the batch axis."""
        if rows == 0:
            return [o.empty for o in self._outputs]
        parts = [
            self._invoke([a[i : i + 1] if p.batch_one else a for p, a in zip(self._inputs, arrays, strict=True)])
            for i in range(rows)
        ]
        return [np.concatenate(column) for column in zip(*parts, strict=True)]

    def _invoke(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        interpreter = self.interpreter
        if self._shapes != [array.shape for array in arrays]:
            self._resize(arrays)
        for plan, array in zip(self._inputs, arrays, strict=True):
            interpreter.set_tensor(plan.index, array)
        interpreter.invoke()
        return [interpreter.get_tensor(o.index) for o in self._outputs]  # get_tensor copies

    def _resize(self, arrays: list[np.ndarray]) -> None:
        """Give the interpreter's inputs these shapes; after a failure the next call resizes again."""
        self._shapes = [None] * len(arrays)
        for plan, array in zip(self._inputs, arrays, strict=True):
            self.interpreter.resize_tensor_input(plan.index, list(array.shape))
        self.interpreter.allocate_tensors()
        self._shapes = [array.shape for array in arrays]
