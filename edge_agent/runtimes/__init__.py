"""Local runtimes behind one small interface, chosen by the artifact's runtime and the device profile.

| artifact runtime | backend | verified here |
| --- | --- | --- |
| ``onnxruntime`` | ONNX Runtime, CPU EP | yes |
| ``onnxruntime-cuda`` / ``onnxruntime-tensorrt`` | ORT CUDA / TensorRT EP, CPU fallback | CPU fallback only |
| ``tflite`` | LiteRT (``ai_edge_litert``, else ``tflite_runtime``) | yes |
| ``tensorrt`` | native TensorRT engine built on the device from ONNX + ``trt_build.json`` | no (needs a GPU) |

Every runtime answers with the manifest's interface (names, dtypes, any batch up to ``max_batch``)
whatever its model file does differently: LiteRT and TensorRT cast inputs to their tensors' dtypes
(int64 ids → int32 when the values fit) and outputs back, and split a call into batches the model
takes (row by row for a TFLite graph with its batch fixed at 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from device_profiles import DeviceProfile
from edge_agent.protocol.manifest import Manifest, TensorSpec
from edge_agent.runtimes.validation import InputValidator


class Runtime(Protocol):
    manifest: Manifest

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name; thread-safe."""
        ...


def open_runtime(
    directory: Path, manifest: Manifest, profile: DeviceProfile | None = None, cache_dir: Path | None = None
) -> Runtime:
    """Open the runtime an installed artifact needs; a missing backend names the extra to install."""
    if manifest.runtime.startswith("onnxruntime"):
        from edge_agent.runtimes.onnxruntime import OnnxRuntimeSession

        return OnnxRuntimeSession(directory, manifest, profile)
    if manifest.runtime == "tflite":
        from edge_agent.runtimes.litert import LiteRtSession

        return LiteRtSession(directory, manifest, profile)
    if manifest.runtime == "tensorrt":
        from edge_agent.runtimes.tensorrt import TensorRtEngine

        return TensorRtEngine(directory, manifest, cache_dir or directory / ".engines")
    raise NotImplementedError(f"runtime {manifest.runtime!r} is not supported by this edgefed version")


def zero_inputs(specs: tuple[TensorSpec, ...]) -> dict[str, np.ndarray]:
    """One row of zeros per input (empty strings for BYTES), dynamic axes of size 1: a warm-up or
    health-check call."""
    feed = {}
    for spec in specs:
        shape = [d if isinstance(d, int) else 1 for d in spec.shape]
        feed[spec.name] = np.full(shape, "", dtype=object) if spec.dtype == "bytes" else np.zeros(shape, spec.dtype)
    return feed


__all__ = ["InputValidator", "Runtime", "open_runtime", "zero_inputs"]
