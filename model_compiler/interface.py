"""The interface every artifact of one compile shares, read from the fp32 ONNX model: input and output
names, dtypes and shapes (a dynamic first axis is "batch"). Types a manifest cannot describe are
refused here, by name, before anything is built."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_compiler.data import ONNX_DTYPES
from model_compiler.errors import CompileError

SUPPORTED = ", ".join(t.removeprefix("tensor(").removesuffix(")") for t in ONNX_DTYPES)


@dataclass(frozen=True)
class Signature:
    """Manifest tensor specs (``{"name", "dtype", "shape"}``) of a model's inputs and outputs."""

    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]


def model_signature(path: Path) -> Signature:
    """The manifest specs of the ONNX model at ``path``; raises CompileError naming a tensor whose type
    edgefed cannot carry (complex, bfloat16, float8, sequences, maps) or whose rank is unknown."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if not all(v.type.tensor_type.HasField("shape") for v in (*model.graph.input, *model.graph.output)):
        with contextlib.suppress(Exception):  # some converters leave shapes out; if inference fails too,
            model = onnx.shape_inference.infer_shapes(model)  # the tensor is refused below, by name
    graph = model.graph
    weights = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in weights]
    return Signature([_spec(v, "input") for v in inputs], [_spec(v, "output") for v in graph.output])


def onnx_type(value: Any) -> str:
    """ONNX Runtime's spelling of a graph value's type: 'tensor(float)', 'tensor(complex64)'; 'a sequence'
    or 'a map' for values that are not tensors."""
    import onnx

    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return f"a {kind.removesuffix('_type')}" if kind else "an untyped value"
    return f"tensor({onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type).lower()})"


def _spec(value: Any, role: str) -> dict[str, Any]:
    kind = onnx_type(value)
    dtype = ONNX_DTYPES.get(kind)
    if dtype is None:
        raise CompileError(f"{role} {value.name!r} is {kind}, which edgefed cannot carry; supported: {SUPPORTED}. "
                           f"Change the model so its {role}s use one of those types")  # fmt: skip
    if not value.type.tensor_type.HasField("shape"):
        raise CompileError(f"{role} {value.name!r} has no known rank; export the model with {role} shapes")
    return {
        "name": value.name,
        "dtype": dtype,
        "shape": [_dim(d, axis) for axis, d in enumerate(value.type.tensor_type.shape.dim)],
    }


def _dim(dim: Any, axis: int) -> int | str:
    """A fixed size, or the name of a dynamic axis ("batch" for the first)."""
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    return "batch" if axis == 0 else str(dim.dim_param or f"dim{axis}")
