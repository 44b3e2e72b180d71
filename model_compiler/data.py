"""Model inputs as named arrays: one array for a single-input model, a dict for several (tokens and
attention masks). Every helper here works on the dict form, rows along axis 0."""

from __future__ import annotations

from typing import Any

import numpy as np

from model_compiler.errors import DataError

Feeds = dict[str, np.ndarray]
# ONNX tensor types → manifest dtypes: everything an artifact can carry; any other type is refused by name
ONNX_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16", "tensor(int8)": "int8",
               "tensor(uint64)": "uint64", "tensor(uint32)": "uint32", "tensor(uint16)": "uint16",
               "tensor(uint8)": "uint8", "tensor(bool)": "bool", "tensor(string)": "bytes"}  # fmt: skip


def as_feeds(data: np.ndarray | Feeds, session: Any, role: str) -> Feeds:
    """Name the data after the model's inputs and check dtypes and fixed dimensions against them."""
    inputs = session.get_inputs()
    names = [i.name for i in inputs]
    if isinstance(data, np.ndarray):
        if len(names) != 1:
            raise DataError(f"--{role}: the model takes {names}; save one array per input: np.savez(f, {names[0]}=...)")
        data = {names[0]: data}
    if set(data) != set(names):
        raise DataError(f"--{role}: arrays {sorted(data)} do not match the model's inputs {names}")
    feeds = {}
    for spec in inputs:
        array = _as_dtype(data[spec.name], ONNX_DTYPES.get(spec.type), spec.name, role)
        fixed = [(axis, d) for axis, d in enumerate(spec.shape) if isinstance(d, int)]
        if array.ndim != len(spec.shape) or any(array.shape[axis] != d for axis, d in fixed):
            raise DataError(f"--{role}: '{spec.name}' is shaped {list(array.shape)}, the model takes "
                            f"{[d if isinstance(d, int) else '?' for d in spec.shape]}")  # fmt: skip
        feeds[spec.name] = array
    if len({len(a) for a in feeds.values()}) != 1:
        raise DataError(f"--{role}: the arrays have different numbers of rows")
    return feeds


def _as_dtype(array: np.ndarray, dtype: str | None, name: str, role: str) -> np.ndarray:
    """``array`` in the model's dtype: a same-kind cast for numbers; strings as an object array (what
    ONNX Runtime and the edge runtimes take for BYTES tensors)."""
    if dtype == "bytes":
        if array.dtype.kind not in "OUS":
            raise DataError(f"--{role}: '{name}' is {array.dtype}, the model takes strings")
        return array if array.dtype.kind == "O" else array.astype(object)
    if dtype is not None and array.dtype != np.dtype(dtype):
        if not np.can_cast(array.dtype, dtype, casting="same_kind"):
            raise DataError(f"--{role}: '{name}' is {array.dtype}, the model takes {dtype}")
        return array.astype(dtype)
    return array


def is_numeric(array: np.ndarray) -> bool:
    """Numbers (and booleans) that histograms and distance metrics can work on; not strings."""
    return array.dtype.kind in "biuf"


def rows(feeds: Feeds) -> int:
    return len(next(iter(feeds.values())))


def take(feeds: Feeds, start: int, stop: int) -> Feeds:
    return {name: array[start:stop] for name, array in feeds.items()}
