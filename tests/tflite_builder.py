"""Build a real TFLite flatbuffer (one FULLY_CONNECTED op) without TensorFlow, for LiteRT tests.

Uses the generated schema bindings of the ``tflite`` package with ``flatbuffers``; the result loads in
the real LiteRT interpreter (``ai_edge_litert``)."""

from __future__ import annotations

from pathlib import Path

import flatbuffers
import numpy as np
import tflite

FLOAT32, FULLY_CONNECTED = 0, 9


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


def _tensor(builder: flatbuffers.Builder, name: str, shape: list[int], buffer: int) -> int:
    name_offset = builder.CreateString(name)
    shape_offset = _int_vector(builder, tflite.TensorStartShapeVector, [max(d, 1) for d in shape])
    signature = _int_vector(builder, tflite.TensorStartShapeSignatureVector, shape)
    tflite.TensorStart(builder)
    tflite.TensorAddShape(builder, shape_offset)
    tflite.TensorAddShapeSignature(builder, signature)
    tflite.TensorAddType(builder, FLOAT32)
    tflite.TensorAddBuffer(builder, buffer)
    tflite.TensorAddName(builder, name_offset)
    return int(tflite.TensorEnd(builder))


def dense_tflite(path: Path, weight: np.ndarray, bias: np.ndarray) -> None:
    """y = x @ weight + bias as a TFLite model; input 'input' [-1, in], output 'output' [-1, out]."""
    features, classes = weight.shape
    builder = flatbuffers.Builder(4096)
    buffers = [
        _buffer(builder, b""),
        _buffer(builder, np.ascontiguousarray(weight.T, np.float32).tobytes()),
        _buffer(builder, bias.astype(np.float32).tobytes()),
        _buffer(builder, b""),
        _buffer(builder, b""),
    ]
    tensors = [
        _tensor(builder, "input", [-1, features], 3),
        _tensor(builder, "weight", [classes, features], 1),
        _tensor(builder, "bias", [classes], 2),
        _tensor(builder, "output", [-1, classes], 4),
    ]
    op_inputs = _int_vector(builder, tflite.OperatorStartInputsVector, [0, 1, 2])
    op_outputs = _int_vector(builder, tflite.OperatorStartOutputsVector, [3])
    tflite.OperatorStart(builder)
    tflite.OperatorAddOpcodeIndex(builder, 0)
    tflite.OperatorAddInputs(builder, op_inputs)
    tflite.OperatorAddOutputs(builder, op_outputs)
    operator = tflite.OperatorEnd(builder)
    tensor_vector = _offset_vector(builder, tflite.SubGraphStartTensorsVector, tensors)
    graph_inputs = _int_vector(builder, tflite.SubGraphStartInputsVector, [0])
    graph_outputs = _int_vector(builder, tflite.SubGraphStartOutputsVector, [3])
    operators = _offset_vector(builder, tflite.SubGraphStartOperatorsVector, [operator])
    tflite.SubGraphStart(builder)
    tflite.SubGraphAddTensors(builder, tensor_vector)
    tflite.SubGraphAddInputs(builder, graph_inputs)
    tflite.SubGraphAddOutputs(builder, graph_outputs)
    tflite.SubGraphAddOperators(builder, operators)
    subgraph = tflite.SubGraphEnd(builder)
    tflite.OperatorCodeStart(builder)
    tflite.OperatorCodeAddDeprecatedBuiltinCode(builder, FULLY_CONNECTED)
    tflite.OperatorCodeAddBuiltinCode(builder, FULLY_CONNECTED)
    tflite.OperatorCodeAddVersion(builder, 1)
    opcode = tflite.OperatorCodeEnd(builder)
    opcodes = _offset_vector(builder, tflite.ModelStartOperatorCodesVector, [opcode])
    subgraphs = _offset_vector(builder, tflite.ModelStartSubgraphsVector, [subgraph])
    buffer_vector = _offset_vector(builder, tflite.ModelStartBuffersVector, buffers)
    description = builder.CreateString("edgefed test dense model")
    tflite.ModelStart(builder)
    tflite.ModelAddVersion(builder, 3)
    tflite.ModelAddOperatorCodes(builder, opcodes)
    tflite.ModelAddSubgraphs(builder, subgraphs)
    tflite.ModelAddDescription(builder, description)
    tflite.ModelAddBuffers(builder, buffer_vector)
    builder.Finish(tflite.ModelEnd(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())
