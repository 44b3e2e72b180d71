"""Native TensorRT: build the engine on the device from the artifact's ONNX + ``trt_build.json``, once,
and cache it keyed by artifact, GPU compute capability and TensorRT version (engines are not portable
across either). Device memory goes through ``cuda-python``.

UNVERIFIED: written against the TensorRT 10 Python API and cuda-python, not yet run on a GPU.

``trt_build.json``: ``{"precision": "fp16" | "int8" | "fp32", "workspace_mb": 1024,
"shapes": {"input": {"min": [1, ...], "opt": [8, ...], "max": [64, ...]}}}`` (int8 means the ONNX
carries explicit Q/DQ nodes).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.protocol.atomic import atomic_write_bytes
from edge_agent.protocol.manifest import Manifest


def _imports() -> tuple[Any, Any]:
    try:
        import tensorrt as trt
    except ImportError:
        raise ImportError(
            "TensorRT artifacts need TensorRT: pip install 'edgefed[tensorrt]' (JetPack ships it)"
        ) from None
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart  # cuda-python < 12.6
    return trt, cudart


def _check(result: Any) -> Any:
    """cuda-python returns (error, value...); raise on error, return the value(s)."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise RuntimeError(f"CUDA error {error}")
    return values[0] if len(values) == 1 else values


def engine_cache_key(manifest: Manifest, compute_capability: str, trt_version: str) -> str:
    return f"{manifest.artifact_id[:16]}-sm{compute_capability.replace('.', '')}-trt{trt_version}.engine"


class TensorRtEngine:
    def __init__(self, directory: Path, manifest: Manifest, cache_dir: Path) -> None:
        self.trt, self.cudart = _imports()
        self.manifest = manifest
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        props = _check(self.cudart.cudaGetDeviceProperties(0))
        capability = f"{props.major}.{props.minor}"
        cache_dir.mkdir(parents=True, exist_ok=True)
        cached = cache_dir / engine_cache_key(manifest, capability, self.trt.__version__)
        if not cached.exists():
            atomic_write_bytes(cached, self._build(directory))
        runtime = self.trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(cached.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load the cached engine {cached}; delete it to rebuild")
        self.context = self.engine.create_execution_context()
        self.stream = _check(self.cudart.cudaStreamCreate())
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == self.trt.TensorIOMode.OUTPUT]
        self._lock = threading.Lock()

    def _build(self, directory: Path) -> bytes:
        trt = self.trt
        config_data = json.loads((directory / "trt_build.json").read_text())
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse((directory / "model.onnx").read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse the ONNX model: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config_data.get("workspace_mb", 1024)) << 20)
        precision = config_data.get("precision", "fp32")
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
        shapes = config_data.get("shapes", {})
        if shapes:
            optimization = builder.create_optimization_profile()
            for name, shape in shapes.items():
                optimization.set_shape(name, shape["min"], shape["opt"], shape["max"])
            config.add_optimization_profile(optimization)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError("TensorRT engine build failed; see the TensorRT log above")
        return bytes(serialized)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, trt = self.cudart, self.trt
        with self._lock:
            allocations = []
            try:
                for name, array in inputs.items():
                    host = np.ascontiguousarray(array)
                    self.context.set_input_shape(name, host.shape)
                    pointer = _check(cudart.cudaMalloc(max(host.nbytes, 1)))
                    allocations.append(pointer)
                    _check(
                        cudart.cudaMemcpyAsync(
                            pointer,
                            host.ctypes.data,
                            host.nbytes,
                            cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                            self.stream,
                        )
                    )
                    self.context.set_tensor_address(name, int(pointer))
                outputs = {}
                for name in self.output_names:
                    shape = tuple(self.context.get_tensor_shape(name))
                    outputs[name] = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                    pointer = _check(cudart.cudaMalloc(max(outputs[name].nbytes, 1)))
                    allocations.append(pointer)
                    self.context.set_tensor_address(name, int(pointer))
                if not self.context.execute_async_v3(self.stream):
                    raise RuntimeError("TensorRT execution failed")
                for name, pointer in zip(self.output_names, allocations[len(inputs) :], strict=True):
                    _check(
                        cudart.cudaMemcpyAsync(
                            outputs[name].ctypes.data,
                            pointer,
                            outputs[name].nbytes,
                            cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                            self.stream,
                        )
                    )
                _check(cudart.cudaStreamSynchronize(self.stream))
                return outputs
            finally:
                for pointer in allocations:
                    cudart.cudaFree(pointer)
