"""Local runtimes behind one small interface. ONNX Runtime (CPU) is verified here; the CUDA and
TensorRT execution providers are requested when the profile prefers them and ORT offers them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from device_profiles import DeviceProfile
from edge_agent.errors import InputMismatch
from edge_agent.protocol.manifest import Manifest, TensorSpec

_PROVIDERS = {
    "onnxruntime-tensorrt": "TensorrtExecutionProvider",
    "onnxruntime-cuda": "CUDAExecutionProvider",
    "onnxruntime": "CPUExecutionProvider",
}


class Runtime(Protocol):
    manifest: Manifest

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def _describe(array: np.ndarray) -> str:
    return f"{array.dtype} {list(array.shape)}"


def _expected(spec: TensorSpec) -> str:
    return f"{spec.dtype} {list(spec.shape)}"


def validate_inputs(
    manifest: Manifest, inputs: dict[str, np.ndarray], allow_cast: bool = False
) -> dict[str, np.ndarray]:
    """Check names, dtypes and shapes against the manifest; cast float64→float32 only when allowed."""
    checked: dict[str, np.ndarray] = {}
    names = {spec.name for spec in manifest.inputs}
    for extra in set(inputs) - names:
        raise InputMismatch(extra, f"one of {sorted(names)}", "an unknown input")
    for spec in manifest.inputs:
        if spec.name not in inputs:
            raise InputMismatch(spec.name, _expected(spec), "nothing")
        array = np.asarray(inputs[spec.name])
        if array.dtype != np.dtype(spec.dtype):
            if not (allow_cast and np.can_cast(array.dtype, spec.dtype, casting="same_kind")):
                raise InputMismatch(spec.name, _expected(spec), _describe(array))
            array = array.astype(spec.dtype)
        fixed_ok = all(isinstance(d, str) or d == n for d, n in zip(spec.shape, array.shape, strict=False))
        if array.ndim != len(spec.shape) or not fixed_ok:
            raise InputMismatch(spec.name, _expected(spec), _describe(array))
        checked[spec.name] = array
    return checked


class OnnxRuntimeSession:
    """An ONNX Runtime session over an installed artifact's ``model.onnx``."""

    def __init__(self, directory: Path, manifest: Manifest, profile: DeviceProfile | None = None) -> None:
        import onnxruntime as ort

        self.manifest = manifest
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if profile is not None:
            options.intra_op_num_threads = min(profile.cpu_cores, os.cpu_count() or 1)
        available = set(ort.get_available_providers())
        wanted = [_PROVIDERS[r] for r in (profile.runtimes if profile else ()) if r in _PROVIDERS]
        providers = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(directory / "model.onnx"), options, providers=providers)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs), strict=True))


def open_runtime(directory: Path, manifest: Manifest, profile: DeviceProfile | None = None) -> Runtime:
    if manifest.runtime.startswith("onnxruntime"):
        return OnnxRuntimeSession(directory, manifest, profile)
    raise NotImplementedError(f"runtime {manifest.runtime!r} is not available in this build of edgefed yet")
