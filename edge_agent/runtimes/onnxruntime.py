"""ONNX Runtime: CPU EP (verified), CUDA and TensorRT EPs requested when the artifact's runtime or the
profile asks for them and this ONNX Runtime build offers them (unverified without a GPU)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from device_profiles import DeviceProfile
from edge_agent.errors import InputMismatch
from edge_agent.protocol.manifest import Manifest

GRAPH_LEVELS = {
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}

PROVIDERS = {
    "onnxruntime-tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
    "onnxruntime-cuda": ["CUDAExecutionProvider"],
    "onnxruntime": [],
}


def choose_providers(manifest: Manifest, profile: DeviceProfile | None, available: set[str]) -> list[str]:
    """Providers in preference order, always ending with CPU."""
    wanted = list(PROVIDERS.get(manifest.runtime, []))
    for runtime in profile.runtimes if profile else ():
        wanted += [p for p in PROVIDERS.get(runtime, []) if p not in wanted]
    return [p for p in wanted if p in available] + ["CPUExecutionProvider"]


class OnnxRuntimeSession:
    """An ONNX Runtime session over an installed artifact's ``model.onnx`` (``run`` is thread-safe)."""

    def __init__(self, directory: Path, manifest: Manifest, profile: DeviceProfile | None = None,
                 prefer_gpu: bool = False, threads: int = 0, spinning: bool = True) -> None:  # fmt: skip
        """``threads`` (intra-op) overrides the profile's; ``spinning=False`` stops idle intra-op threads
        from busy-waiting, which a server that shares its cores with gRPC work wants."""
        import onnxruntime as ort

        self.manifest = manifest
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, GRAPH_LEVELS[profile.graph_optimization if profile else "all"]
        )
        if profile is not None:
            options.intra_op_num_threads = profile.intra_op_threads or min(
                profile.cpu_cores, len(os.sched_getaffinity(0))
            )
        if threads:
            options.intra_op_num_threads = threads
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = set(ort.get_available_providers())
        providers = choose_providers(manifest, profile, available)
        if prefer_gpu and "CUDAExecutionProvider" in available and "CUDAExecutionProvider" not in providers:
            providers.insert(0, "CUDAExecutionProvider")  # the hub serves on its GPU whatever the artifact's target
        self.session = ort.InferenceSession(str(directory / "model.onnx"), options, providers=providers)
        self.providers = self.session.get_providers()
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.string_inputs = [i.name for i in self.session.get_inputs() if i.type == "tensor(string)"]
        self.string_outputs = [o.name for o in self.session.get_outputs() if o.type == "tensor(string)"]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.string_inputs:  # ORT reads bytes objects as "b'..'" and |S arrays as garbage: give it str
            inputs = {**inputs, **{n: _as_str(n, inputs[n]) for n in self.string_inputs if n in inputs}}
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, inputs), strict=True))
        for name in self.string_outputs:  # BYTES as the interface (and the cloud route) gives them
            outputs[name] = _as_bytes(outputs[name])
        return outputs


def _as_str(name: str, array: np.ndarray) -> np.ndarray:
    """An object array of str; bytes are decoded as UTF-8 (ONNX strings are UTF-8)."""
    return _objects([_text(name, i, v) for i, v in enumerate(array.reshape(-1))], array.shape)


def _text(name: str, index: int, value: Any) -> Any:
    if not isinstance(value, bytes):
        return value
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise InputMismatch(
            name, "UTF-8 text (ONNX strings are UTF-8)", f"bytes not UTF-8 at element {index}"
        ) from None


def _as_bytes(array: np.ndarray) -> np.ndarray:
    return _objects([v.encode() if isinstance(v, str) else v for v in array.reshape(-1)], array.shape)


def _objects(values: list[Any], shape: tuple[int, ...]) -> np.ndarray:
    result = np.empty(len(values), dtype=object)
    result[:] = values
    return result.reshape(shape)
