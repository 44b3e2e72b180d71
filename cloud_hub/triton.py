"""Triton Inference Server's model repository layout for an ONNX artifact (``cloud-hub export-triton``):

    DIR/NAME/config.pbtxt      platform "onnxruntime_onnx", inputs and outputs from the manifest
    DIR/NAME/<release>/model.onnx

The version directory is the artifact's **release number** (Triton versions are positive integers; the
hub's own OIP server also reads an integer version as a release number, so ``version "3"`` names the same
model on both). ``max_batch_size``: when every input and output has a dynamic first axis (the batch
axis), Triton batches on it and the dims written leave it out; the default is the manifest's
``max_batch`` (the most rows a call may carry), else ``DEFAULT_MAX_BATCH`` (the hub's --max-batch-rows
default). Otherwise, or with ``max_batch_size=0``, it is 0 and the dims are the full shape, -1 for each
dynamic axis.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edge_agent.protocol.atomic import atomic_write_bytes, publish_dir
from edge_agent.protocol.manifest import Manifest, TensorSpec

PLATFORM = "onnxruntime_onnx"
MODEL_FILE = "model.onnx"
DEFAULT_MAX_BATCH = 32
TRITON_TYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int64": "TYPE_INT64",
    "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8", "uint64": "TYPE_UINT64",
    "uint32": "TYPE_UINT32", "uint16": "TYPE_UINT16", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
    "bytes": "TYPE_STRING",
}  # fmt: skip


class ExportError(ValueError):
    """The artifact cannot be exported as asked; the message says what to do."""


@dataclass(frozen=True)
class TritonModel:
    """What ``config.pbtxt`` says of one model."""

    name: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def dims(self, spec: TensorSpec) -> list[int]:
        shape = spec.shape[1:] if self.max_batch_size else spec.shape
        return [d if isinstance(d, int) else -1 for d in shape]


def batchable(manifest: Manifest) -> bool:
    """Every input and output has a dynamic first axis: Triton may batch on it."""
    return all(s.shape and isinstance(s.shape[0], str) for s in (*manifest.inputs, *manifest.outputs))


def triton_model(manifest: Manifest, max_batch_size: int | None = None) -> TritonModel:
    """The Triton view of ``manifest``; ExportError for a runtime other than ONNX Runtime or a batch size
    the model's shapes cannot take."""
    if not manifest.runtime.startswith("onnxruntime") or MODEL_FILE not in [f.path for f in manifest.files]:
        raise ExportError(f"{manifest.name}@{manifest.version} for {manifest.hardware.profile} is a "
                          f"{manifest.runtime} artifact; Triton's onnxruntime backend needs an ONNX one")  # fmt: skip
    if max_batch_size is None:
        max_batch_size = (manifest.max_batch or DEFAULT_MAX_BATCH) if batchable(manifest) else 0
    if max_batch_size < 0 or (max_batch_size and not batchable(manifest)):
        raise ExportError(f"--max-batch-size {max_batch_size}: {manifest.name}@{manifest.version} has no dynamic "
                          "batch axis first on every input and output; use --max-batch-size 0")  # fmt: skip
    if manifest.max_batch and max_batch_size > manifest.max_batch:
        raise ExportError(f"--max-batch-size {max_batch_size} is above the {manifest.max_batch} rows a call of "
                          f"{manifest.name}@{manifest.version} may carry (its manifest's max_batch)")  # fmt: skip
    for spec in (*manifest.inputs, *manifest.outputs):
        if spec.dtype not in TRITON_TYPES:
            raise ExportError(f"{spec.name}: dtype {spec.dtype} has no Triton data type")
    return TritonModel(manifest.name, max_batch_size, manifest.inputs, manifest.outputs)


def config_pbtxt(model: TritonModel) -> str:
    """``config.pbtxt`` (protobuf text format of Triton's ModelConfig)."""
    lines = [f"name: {json.dumps(model.name)}", f'platform: "{PLATFORM}"', f"max_batch_size: {model.max_batch_size}"]
    for field, specs in (("input", model.inputs), ("output", model.outputs)):
        lines.append(f"{field} [")
        entries = [
            f"  {{\n    name: {json.dumps(s.name)}\n    data_type: {TRITON_TYPES[s.dtype]}\n"
            f"    dims: [ {', '.join(str(d) for d in model.dims(s))} ]\n  }}"
            for s in specs
        ]
        lines += [",\n".join(entries), "]"]
    if model.max_batch_size:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


def write_model(repository: Path, model: TritonModel, version: int, onnx_file: Path, replace: bool) -> Path:
    """Write ``repository/NAME/config.pbtxt`` and move ``onnx_file`` to ``repository/NAME/<version>/model.onnx``
    (the version directory appears whole or not at all); the version directory."""
    model_dir = repository / model.name
    final = model_dir / str(version)
    if final.exists() and not replace:
        raise ExportError(f"{final} exists (already exported); pass --force to replace it")
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=model_dir))
    try:
        shutil.move(onnx_file, staging / MODEL_FILE)
        staging.chmod(0o755)
        if final.exists():
            shutil.rmtree(final)
        publish_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    atomic_write_bytes(model_dir / "config.pbtxt", config_pbtxt(model).encode())
    return final
