"""numpy ⇄ Open Inference Protocol tensors, in both ``raw_*_contents`` and typed ``contents`` forms."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

# datatype name → (numpy dtype, InferTensorContents field)
DATATYPES: dict[str, tuple[Any, str]] = {
    "BOOL": (np.bool_, "bool_contents"),
    "UINT8": (np.uint8, "uint_contents"),
    "UINT16": (np.uint16, "uint_contents"),
    "UINT32": (np.uint32, "uint_contents"),
    "UINT64": (np.uint64, "uint64_contents"),
    "INT8": (np.int8, "int_contents"),
    "INT16": (np.int16, "int_contents"),
    "INT32": (np.int32, "int_contents"),
    "INT64": (np.int64, "int64_contents"),
    "FP16": (np.float16, "fp32_contents"),
    "FP32": (np.float32, "fp32_contents"),
    "FP64": (np.float64, "fp64_contents"),
    "BYTES": (np.object_, "bytes_contents"),
}
# manifest dtype → OIP datatype, and back
OIP_DATATYPES = {"bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
                 "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64", "float16": "FP16",
                 "float32": "FP32", "float64": "FP64", "bytes": "BYTES"}  # fmt: skip
MANIFEST_DTYPES = {oip: dtype for dtype, oip in OIP_DATATYPES.items()}
_BY_NUMPY = {np.dtype(v[0]): k for k, v in DATATYPES.items() if k != "BYTES"}
_WIRE_DTYPES = {k: np.dtype(v[0]).newbyteorder("<") for k, v in DATATYPES.items() if k != "BYTES"}


class TensorError(ValueError):
    """A tensor's datatype, shape or contents do not agree."""


def datatype_of(array: np.ndarray) -> str:
    if array.dtype.kind in ("O", "S", "U"):
        return "BYTES"
    try:
        return _BY_NUMPY[array.dtype]
    except KeyError:
        raise TensorError(f"dtype {array.dtype} has no Open Inference Protocol datatype") from None


def _encode_bytes(array: np.ndarray) -> bytes:
    parts = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(len(data).to_bytes(4, "little") + data)
    return b"".join(parts)


def _decode_bytes(raw: bytes, count: int) -> np.ndarray:
    items, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise TensorError("BYTES tensor is truncated")
        size = int.from_bytes(raw[offset : offset + 4], "little")
        items.append(raw[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return np.array(items, dtype=np.object_)


def to_raw(array: np.ndarray) -> bytes:
    """The raw little-endian bytes of a tensor (BYTES: 4-byte length prefix per element)."""
    if datatype_of(array) == "BYTES":
        return _encode_bytes(array)
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and sys.byteorder == "big"):
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.tobytes()  # C order whatever the array's layout


def from_raw(raw: bytes, datatype: str, shape: Sequence[int]) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        return _decode_bytes(raw, count).reshape(shape)
    dtype = _WIRE_DTYPES.get(datatype)
    if dtype is None:
        raise TensorError(f"unknown datatype {datatype!r}")
    if len(raw) != count * dtype.itemsize:
        raise TensorError(
            f"raw contents hold {len(raw)} bytes, shape {shape} of {datatype} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def from_contents(contents: Any, datatype: str, shape: Sequence[int]) -> np.ndarray:
    if datatype not in DATATYPES:
        raise TensorError(f"unknown datatype {datatype!r}")
    dtype, field = DATATYPES[datatype]
    values = list(getattr(contents, field))
    count = math.prod(shape)
    if len(values) != count:
        raise TensorError(f"contents hold {len(values)} values, shape {shape} needs {count}")
    return np.array(values, dtype=dtype).reshape(shape)
