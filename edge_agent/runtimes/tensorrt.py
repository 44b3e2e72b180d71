"""Native TensorRT: build the engine on the device from the artifact's ONNX + ``trt_build.json``, once,
and cache it keyed by artifact, GPU compute capability and TensorRT version (engines are not portable
across either). Device memory goes through ``cuda-python``.

Callers see the manifest's interface: inputs are cast to the engine's binding dtypes (int64 token ids
to int32 when every value fits, else ``ValueError`` naming the input), outputs back to the interface's,
and a call with more rows than the engine's largest profile shape (``shapes[...]["max"][0]``, or a
static batch) runs in chunks whose outputs are concatenated along the batch axis.

UNVERIFIED: written against the TensorRT 10 Python API and cuda-python, not yet run on a GPU (the
dtype casts and batch chunking included).

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
from edge_agent.protocol.manifest import Manifest, TensorSpec
from edge_agent.runtimes.validation import TensorCast, numpy_dtype


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


def max_rows(specs: tuple[TensorSpec, ...], shapes: dict[str, Any], static: dict[str, int]) -> int:
    """The most rows one execution takes: the smallest profile ``max`` batch (else static batch) over
    the inputs whose first axis is dynamic in the interface; 0 when nothing limits it."""
    limits = []
    for spec in specs:
        if not spec.shape or isinstance(spec.shape[0], int):
            continue
        if spec.name in shapes:
            limits.append(int(shapes[spec.name]["max"][0]))
        elif static.get(spec.name, -1) > 0:
            limits.append(static[spec.name])
    return min(limits, default=0)


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
        self._casts = {s.name: TensorCast.to(s.name, self._binding_dtype(s.name)) for s in manifest.inputs}
        wanted = {s.name: numpy_dtype(s.dtype) for s in manifest.outputs}
        self._output_dtypes = {n: wanted[n] for n in self.output_names if n in wanted}
        self._batched = tuple(s.name for s in manifest.inputs if s.shape and isinstance(s.shape[0], str))
        self.max_rows = max_rows(manifest.inputs, _profile_shapes(directory), self._static_batches())
        self._lock = threading.Lock()

    def _binding_dtype(self, name: str) -> np.dtype[Any]:
        dtype: np.dtype[Any] = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))
        return dtype

    def _static_batches(self) -> dict[str, int]:
        return {s.name: int(self.engine.get_tensor_shape(s.name)[0]) for s in self.manifest.inputs if s.shape}

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
        arrays = {name: self._casts[name](array) for name, array in inputs.items()}
        rows = arrays[self._batched[0]].shape[0] if self._batched else 0
        chunked = self.max_rows and rows > self.max_rows
        with self._lock:
            outputs = self._chunked(arrays, rows) if chunked else self._execute(arrays)
        return {n: a if n not in self._output_dtypes else a.astype(self._output_dtypes[n], copy=False)
                for n, a in outputs.items()}  # fmt: skip

    def _chunked(self, arrays: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        """At most ``max_rows`` rows per execution, outputs concatenated along the batch axis."""
        parts = []
        for start in range(0, rows, self.max_rows):
            chunk = {n: a[start : start + self.max_rows] if n in self._batched else a for n, a in arrays.items()}
            parts.append(self._execute(chunk))
        return {name: np.concatenate([part[name] for part in parts]) for name in self.output_names}

    def _execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, trt = self.cudart, self.trt
        allocations = []
        hosts = [np.ascontiguousarray(array) for array in inputs.values()]  # alive until the stream syncs
        try:
            for name, host in zip(inputs, hosts, strict=True):
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
            outputs: dict[str, np.ndarray] = {}
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


def _profile_shapes(directory: Path) -> dict[str, Any]:
    path = directory / "trt_build.json"
    shapes = json.loads(path.read_text()).get("shapes", {}) if path.exists() else {}
    return shapes if isinstance(shapes, dict) else {}
