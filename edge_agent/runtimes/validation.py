"""Input validation against the manifest's signature, compiled once per loaded model (hot path)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_agent.errors import InputMismatch
from edge_agent.protocol.manifest import Manifest, TensorSpec


@dataclass(frozen=True)
class _Spec:
    name: str
    dtype: np.dtype
    ndim: int
    fixed: tuple[tuple[int, int], ...]  # (axis, size) for every non-dynamic dimension
    text: str


def _compile(spec: TensorSpec) -> _Spec:
    fixed = tuple((axis, d) for axis, d in enumerate(spec.shape) if isinstance(d, int))
    dtype = np.dtype(object) if spec.dtype == "bytes" else np.dtype(spec.dtype)
    return _Spec(spec.name, dtype, len(spec.shape), fixed, f"{spec.dtype} {list(spec.shape)}")


class InputValidator:
    """Checks names, dtypes and shapes; casts (e.g. float64 → float32) only when ``allow_cast``."""

    def __init__(self, manifest: Manifest) -> None:
        self.specs = tuple(_compile(s) for s in manifest.inputs)
        self.names = frozenset(s.name for s in self.specs)

    def __call__(self, inputs: dict[str, np.ndarray], allow_cast: bool = False) -> dict[str, np.ndarray]:
        if len(inputs) != len(self.specs):
            self._names_error(inputs)
        checked = inputs
        for spec in self.specs:
            try:
                array = inputs[spec.name]
            except KeyError:
                self._names_error(inputs)
            if type(array) is not np.ndarray:
                array = np.asarray(array)
            if array.dtype != spec.dtype:
                if not (allow_cast and np.can_cast(array.dtype, spec.dtype, casting="same_kind")):
                    raise InputMismatch(spec.name, spec.text, f"{array.dtype} {list(array.shape)}")
                array = array.astype(spec.dtype)
            if array.ndim != spec.ndim or any(array.shape[axis] != size for axis, size in spec.fixed):
                raise InputMismatch(spec.name, spec.text, f"{array.dtype} {list(array.shape)}")
            if array is not inputs[spec.name]:
                checked = dict(checked) if checked is inputs else checked
                checked[spec.name] = array
        return checked

    def _names_error(self, inputs: dict[str, np.ndarray]) -> None:
        for extra in set(inputs) - self.names:
            raise InputMismatch(extra, f"one of {sorted(self.names)}", "an unknown input")
        for spec in self.specs:
            if spec.name not in inputs:
                raise InputMismatch(spec.name, spec.text, "nothing")
