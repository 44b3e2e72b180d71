"""Input validation against the manifest's interface, compiled once per loaded model (hot path).

Checks names, dtypes, ranks and fixed dimensions; the manifest's ``max_batch`` (when > 0) on every
input whose first axis is dynamic; and that inputs whose first axis is the same named dynamic axis
(``"batch"``) carry the same number of rows."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.errors import InputMismatch
from edge_agent.protocol.manifest import Interface, Manifest, TensorSpec


def numpy_dtype(dtype: str) -> np.dtype[Any]:
    """The numpy dtype of a manifest dtype (``bytes`` tensors are object arrays of bytes or str)."""
    return np.dtype(object) if dtype == "bytes" else np.dtype(dtype)


@dataclass(frozen=True)
class TensorCast:
    """Casts one input to the dtype a runtime's tensor takes (planned once per model): int64 token ids
    to an int32 tensor only when every value fits, else ``InputMismatch`` naming the input (the
    caller's data, not a runtime failure: it never moves traffic to the cloud)."""

    name: str
    dtype: np.dtype[Any]
    bounds: tuple[int, int] | None  # the target's integer range, checked when a wider integer arrives

    @classmethod
    def to(cls, name: str, dtype: Any) -> TensorCast:
        target = np.dtype(dtype)
        info = np.iinfo(target) if target.kind in "iu" else None
        return cls(name, target, (int(info.min), int(info.max)) if info else None)

    def __call__(self, array: np.ndarray) -> np.ndarray:
        if array.dtype == self.dtype:
            return array
        if self.bounds is not None and array.dtype.kind in "iu" and not np.can_cast(array.dtype, self.dtype):
            self._check_range(array)
        return array.astype(self.dtype)

    def _check_range(self, array: np.ndarray) -> None:
        low, high = self.bounds or (0, 0)
        if array.size and (array.min() < low or array.max() > high):
            raise InputMismatch(self.name, f"values in [{low}, {high}] (the model takes {self.dtype} here)",
                                f"{array.dtype} values in [{array.min()}, {array.max()}]")  # fmt: skip


@dataclass(frozen=True)
class _Spec:
    name: str
    dtype: np.dtype[Any]
    ndim: int
    fixed: tuple[tuple[int, int], ...]  # (axis, size) for every non-dynamic dimension
    text: str


def _compile(spec: TensorSpec) -> _Spec:
    fixed = tuple((axis, d) for axis, d in enumerate(spec.shape) if isinstance(d, int))
    return _Spec(spec.name, numpy_dtype(spec.dtype), len(spec.shape), fixed, f"{spec.dtype} {list(spec.shape)}")


def _batch_axis(spec: TensorSpec) -> str | None:
    return spec.shape[0] if spec.shape and isinstance(spec.shape[0], str) else None


def _row_groups(specs: tuple[TensorSpec, ...]) -> tuple[tuple[str, ...], ...]:
    """Names of the inputs that share a named dynamic first axis, one tuple per axis name (two or more)."""
    axes = Counter(a for a in map(_batch_axis, specs) if a is not None)
    return tuple(tuple(s.name for s in specs if _batch_axis(s) == a) for a, n in axes.items() if n > 1)


class InputValidator:
    """Checks names, dtypes and shapes against an interface (or a manifest's); casts (e.g. float64 →
    float32) only when ``allow_cast``."""

    def __init__(self, interface: Interface | Manifest) -> None:
        self.specs = tuple(_compile(s) for s in interface.inputs)
        self.names = frozenset(s.name for s in self.specs)
        self.max_batch = interface.max_batch
        self._limited = tuple(s.name for s in interface.inputs if interface.max_batch > 0 and _batch_axis(s))
        self._groups = _row_groups(interface.inputs)

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
        for name in self._limited:  # empty unless max_batch > 0
            if checked[name].shape[0] > self.max_batch:
                self._max_batch_error(name, checked[name].shape[0])
        if self._groups:
            self._check_rows(checked)
        return checked

    def _max_batch_error(self, name: str, rows: int) -> None:
        raise InputMismatch(name, f"at most {self.max_batch} rows (the model's max_batch)", f"{rows} rows")

    def _check_rows(self, inputs: dict[str, np.ndarray]) -> None:
        for names in self._groups:
            first = inputs[names[0]].shape[0]
            for name in names[1:]:
                rows = inputs[name].shape[0]
                if rows != first:
                    raise InputMismatch(name, f"{first} rows, like input {names[0]!r}", f"{rows} rows")

    def _names_error(self, inputs: dict[str, np.ndarray]) -> None:
        for extra in set(inputs) - self.names:
            raise InputMismatch(extra, f"one of {sorted(self.names)}", "an unknown input")
        for spec in self.specs:
            if spec.name not in inputs:
                raise InputMismatch(spec.name, spec.text, "nothing")
