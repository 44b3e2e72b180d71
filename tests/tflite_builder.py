"""Build real TFLite flatbuffers without TensorFlow, for LiteRT tests.

Uses the generated schema bindings of the ``tflite`` package with ``flatbuffers``; the results load in
the real LiteRT interpreter (``ai_edge_litert``). ``dense_tflite`` builds y = x @ W + b, optionally the
way converters shape real models: int32 token-id style inputs (a CAST in front), a batch fixed at 1
(baked into a RESHAPE, as litert-torch does), an integer output (a CAST at the end), or other names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import flatbuffers
import numpy as np
import tflite

TYPES = {"float32": tflite.TensorType.FLOAT32, "int32": tflite.TensorType.INT32, "int64": tflite.TensorType.INT64}
OPCODES = {
    "FULLY_CONNECTED": tflite.BuiltinOperator.FULLY_CONNECTED,
    "CAST": tflite.BuiltinOperator.CAST,
    "RESHAPE": tflite.BuiltinOperator.RESHAPE,
}


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: list[int]  # -1: dynamic
    dtype: str = "float32"
    data: bytes = b""  # constant contents, empty for activations


@dataclass(frozen=True)
class Op:
    code: str
    inputs: list[int]
    outputs: list[int]


def _int_vector(builder: flatbuffers.Builder, start: object, values: list[int]) -> int:
    start(builder, len(values))  # type: ignore[operator]
    for value in reversed(values):
        builder.PrependInt32(value)
    return int(builder.EndVector())


def _offset_vector(builder: flatbuffers.Builder, start: object, offsets: list[int]) -> int:
    start(builder, len(offsets))  # type: ignore[operator]
    for offset in reversed(offsets):
        builder.PrependUOffsetTRelative(offset)
    return int(builder.EndVector())


def _buffer(builder: flatbuffers.Builder, data: bytes) -> int:
    vector = builder.CreateByteVector(data) if data else None
    tflite.BufferStart(builder)
    if vector is not None:
        tflite.BufferAddData(builder, vector)
    return int(tflite.BufferEnd(builder))


def _tensor(builder: flatbuffers.Builder, tensor: Tensor, buffer: int) -> int:
    name_offset = builder.CreateString(tensor.name)
    shape_offset = _int_vector(builder, tflite.TensorStartShapeVector, [max(d, 1) for d in tensor.shape])
    signature = _int_vector(builder, tflite.TensorStartShapeSignatureVector, tensor.shape)
    tflite.TensorStart(builder)
    tflite.TensorAddShape(builder, shape_offset)
    tflite.TensorAddShapeSignature(builder, signature)
    tflite.TensorAddType(builder, TYPES[tensor.dtype])
    tflite.TensorAddBuffer(builder, buffer)
    tflite.TensorAddName(builder, name_offset)
    return int(tflite.TensorEnd(builder))


def _operator(builder: flatbuffers.Builder, op: Op, opcode_index: int) -> int:
    op_inputs = _int_vector(builder, tflite.OperatorStartInputsVector, op.inputs)
    op_outputs = _int_vector(builder, tflite.OperatorStartOutputsVector, op.outputs)
    tflite.OperatorStart(builder)
    tflite.OperatorAddOpcodeIndex(builder, opcode_index)
    tflite.OperatorAddInputs(builder, op_inputs)
    tflite.OperatorAddOutputs(builder, op_outputs)
    return int(tflite.OperatorEnd(builder))


def _opcode(builder: flatbuffers.Builder, code: str) -> int:
    tflite.OperatorCodeStart(builder)
    tflite.OperatorCodeAddDeprecatedBuiltinCode(builder, OPCODES[code])
    tflite.OperatorCodeAddBuiltinCode(builder, OPCODES[code])
    tflite.OperatorCodeAddVersion(builder, 1)
    return int(tflite.OperatorCodeEnd(builder))


def build_tflite(path: Path, tensors: list[Tensor], ops: list[Op], inputs: list[int], outputs: list[int]) -> None:
    """One subgraph of ``ops`` over ``tensors``; buffer 0 is the schema's empty sentinel."""
    builder = flatbuffers.Builder(4096)
    buffers = [_buffer(builder, b"")] + [_buffer(builder, t.data) for t in tensors]
    tensor_offsets = [_tensor(builder, t, i + 1) for i, t in enumerate(tensors)]
    codes = list(dict.fromkeys(op.code for op in ops))
    operators = [_operator(builder, op, codes.index(op.code)) for op in ops]
    tensor_vector = _offset_vector(builder, tflite.SubGraphStartTensorsVector, tensor_offsets)
    graph_inputs = _int_vector(builder, tflite.SubGraphStartInputsVector, inputs)
    graph_outputs = _int_vector(builder, tflite.SubGraphStartOutputsVector, outputs)
    operator_vector = _offset_vector(builder, tflite.SubGraphStartOperatorsVector, operators)
    tflite.SubGraphStart(builder)
    tflite.SubGraphAddTensors(builder, tensor_vector)
    tflite.SubGraphAddInputs(builder, graph_inputs)
    tflite.SubGraphAddOutputs(builder, graph_outputs)
    tflite.SubGraphAddOperators(builder, operator_vector)
    subgraph = tflite.SubGraphEnd(builder)
    opcodes = _offset_vector(builder, tflite.ModelStartOperatorCodesVector, [_opcode(builder, c) for c in codes])
    subgraphs = _offset_vector(builder, tflite.ModelStartSubgraphsVector, [subgraph])
    buffer_vector = _offset_vector(builder, tflite.ModelStartBuffersVector, buffers)
    description = builder.CreateString("edgefed test model")
    tflite.ModelStart(builder)
    tflite.ModelAddVersion(builder, 3)
    tflite.ModelAddOperatorCodes(builder, opcodes)
    tflite.ModelAddSubgraphs(builder, subgraphs)
    tflite.ModelAddDescription(builder, description)
    tflite.ModelAddBuffers(builder, buffer_vector)
    builder.Finish(tflite.ModelEnd(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())


def dense_tflite(
    path: Path,
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    batch: int = -1,
    input_dtype: str = "float32",
    output_dtype: str = "float32",
    names: tuple[str, str] = ("input", "output"),
) -> None:
    """y = x @ weight + bias as a TFLite model; input ``names[0]`` [batch, in], output ``names[1]`` [batch, out].

    ``batch=1`` fixes the batch the way converters do (a RESHAPE to [1, out] that breaks when the input is
    resized); a non-float ``input_dtype`` / ``output_dtype`` adds a CAST before / after (truncating)."""
    features, classes = weight.shape
    tensors = [
        Tensor(names[0], [batch, features], input_dtype),
        Tensor("weight", [classes, features], data=np.ascontiguousarray(weight.T, np.float32).tobytes()),
        Tensor("bias", [classes], data=bias.astype(np.float32).tobytes()),
    ]
    ops: list[Op] = []

    def add(code: str, inputs: list[int], result: Tensor) -> None:
        tensors.append(result)
        ops.append(Op(code, inputs, [len(tensors) - 1]))

    if input_dtype != "float32":
        add("CAST", [0], Tensor("as_float", [batch, features]))
    add("FULLY_CONNECTED", [len(tensors) - 1 if ops else 0, 1, 2], Tensor("dense", [batch, classes]))
    if batch == 1:
        tensors.append(Tensor("new_shape", [2], "int32", np.array([1, classes], np.int32).tobytes()))
        add("RESHAPE", [len(tensors) - 2, len(tensors) - 1], Tensor("reshaped", [1, classes]))
    if output_dtype != "float32":
        add("CAST", [len(tensors) - 1], Tensor("as_output", [batch, classes], output_dtype))
    last = tensors[-1]
    tensors[-1] = Tensor(names[1], last.shape, last.dtype, last.data)
    build_tflite(path, tensors, ops, [0], [len(tensors) - 1])
