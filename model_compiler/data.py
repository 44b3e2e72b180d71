"""Model inputs as named arrays: one array for a single-input model, a dict for several (tokens and
attention masks). Every helper here works on the dict form, rows along axis 0."""

from __future__ import annotations

from typing import Any

import numpy as np

from model_compiler.errors import DataError

Feeds = dict[str, np.ndarray]
ONNX_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
               "tensor(uint8)": "uint8", "tensor(bool)": "bool"}  # fmt: skip


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
        array = data[spec.name]
        dtype = ONNX_DTYPES.get(spec.type)
        if dtype is not None and array.dtype != np.dtype(dtype):
            if not np.can_cast(array.dtype, dtype, casting="same_kind"):
                raise DataError(f"--{role}: '{spec.name}' is {array.dtype}, the model takes {dtype}")
            array = array.astype(dtype)
        fixed = [(axis, d) for axis, d in enumerate(spec.shape) if isinstance(d, int)]
        if array.ndim != len(spec.shape) or any(array.shape[axis] != d for axis, d in fixed):
            raise DataError(f"--{role}: '{spec.name}' is shaped {list(array.shape)}, the model takes "
                            f"{[d if isinstance(d, int) else '?' for d in spec.shape]}")  # fmt: skip
        feeds[spec.name] = array
    if len({len(a) for a in feeds.values()}) != 1:
        raise DataError(f"--{role}: the arrays have different numbers of rows")
    return feeds


def rows(feeds: Feeds) -> int:
    return len(next(iter(feeds.values())))


def take(feeds: Feeds, start: int, stop: int) -> Feeds:
    return {name: array[start:stop] for name, array in feeds.items()}
