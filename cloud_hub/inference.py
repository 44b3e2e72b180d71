"""Cloud inference: the Open Inference Protocol (KServe v2) gRPC service over registered artifacts.

Models are loaded lazily with ONNX Runtime (CUDA EP when available) and cached per artifact.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from cloud_hub.artifacts import ArtifactStore
from cloud_hub.errors import NotFound
from cloud_hub.registry import Registry
from edge_agent.errors import InputMismatch
from edge_agent.protocol.manifest import Manifest, manifest_from_wire
from edge_agent.protocol.oip import add_servicer, pb
from edge_agent.protocol.oip.tensors import TensorError, datatype_of, from_contents, from_raw, to_raw
from edge_agent.runtimes import validate_inputs
from edge_agent.runtimes.onnxruntime import OnnxRuntimeSession

log = logging.getLogger(__name__)
SERVER_NAME = "edgefed-hub"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_NUMPY_TO_OIP = {
    "float32": "FP32",
    "float16": "FP16",
    "float64": "FP64",
    "int64": "INT64",
    "int32": "INT32",
    "int8": "INT8",
    "uint8": "UINT8",
    "bool": "BOOL",
    "bytes": "BYTES",
}


@dataclass
class _Stats:
    success: int = 0
    fail: int = 0
    success_ns: int = 0
    last_ms: int = 0


@dataclass
class _Served:
    manifest: Manifest
    session: OnnxRuntimeSession
    stats: _Stats = field(default_factory=_Stats)


class ModelRepository:
    """Picks and loads the artifact that answers for (name, version) on this hub."""

    def __init__(self, registry: Registry, store: ArtifactStore, arch: str = "x86_64") -> None:
        self.registry, self.store, self.arch = registry, store, arch
        self._served: dict[str, _Served] = {}
        self._lock = threading.Lock()

    def _pick(self, name: str, version: str) -> dict[str, Any]:
        rows = self.registry.artifacts(name, version or None)
        if not rows:
            raise NotFound(f"model {name}{'@' + version if version else ''} is not registered")
        rows = [r for r in rows if r["release"] == rows[0]["release"]]  # newest release of that version
        manifests = [self.registry.artifact(r["artifact_id"])["manifest"] for r in rows]
        ranked: list[dict[str, Any]] = sorted(
            manifests,
            key=lambda m: (m["hardware"]["accelerator"] == "nvidia-gpu", m["hardware"]["arch"] == self.arch),
            reverse=True,
        )
        return ranked[0]

    def get(self, name: str, version: str) -> _Served:
        manifest = manifest_from_wire(self._pick(name, version))
        served = self._served.get(manifest.artifact_id)
        if served is None:
            with self._lock:
                served = self._served.get(manifest.artifact_id)
                if served is None:
                    session = OnnxRuntimeSession(self.store.path(manifest.artifact_id), manifest)
                    served = _Served(manifest, session)
                    self._served[manifest.artifact_id] = served
        return served

    def loaded(self) -> list[_Served]:
        return list(self._served.values())


def _tensor_metadata(specs: Any) -> list[Any]:
    return [
        pb.ModelMetadataResponse.TensorMetadata(
            name=s.name,
            datatype=_NUMPY_TO_OIP.get(s.dtype, s.dtype.upper()),
            shape=[d if isinstance(d, int) else -1 for d in s.shape],
        )
        for s in specs
    ]


def decode_inputs(request: Any) -> dict[str, np.ndarray]:
    inputs = {}
    use_raw = len(request.raw_input_contents) > 0
    if use_raw and len(request.raw_input_contents) != len(request.inputs):
        raise TensorError("raw_input_contents must hold one entry per input")
    for index, tensor in enumerate(request.inputs):
        shape = list(tensor.shape)
        if use_raw:
            inputs[tensor.name] = from_raw(request.raw_input_contents[index], tensor.datatype, shape)
        else:
            inputs[tensor.name] = from_contents(tensor.contents, tensor.datatype, shape)
    return inputs


class InferenceServicer:
    def __init__(self, repository: ModelRepository, version: str) -> None:
        self.repository, self.version = repository, version

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=True)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=["model_statistics"])

    def _served(self, name: str, version: str, context: grpc.ServicerContext) -> _Served:
        try:
            return self.repository.get(name, version)
        except NotFound as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        raise AssertionError("unreachable")

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            self.repository.get(request.name, request.version)
        except NotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        manifest = self._served(request.name, request.version, context).manifest
        versions = sorted({r["version"] for r in self.repository.registry.artifacts(request.name)})
        return pb.ModelMetadataResponse(
            name=manifest.name,
            versions=versions,
            platform="onnxruntime_onnx",
            inputs=_tensor_metadata(manifest.inputs),
            outputs=_tensor_metadata(manifest.outputs),
        )

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        served = self._served(request.model_name, request.model_version, context)
        start = time.perf_counter_ns()
        try:
            inputs = validate_inputs(served.manifest, decode_inputs(request))
            outputs = served.session.run(inputs)
        except (TensorError, InputMismatch) as exc:
            served.stats.fail += 1
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception:
            served.stats.fail += 1
            log.exception("inference failed for %s@%s", served.manifest.name, served.manifest.version)
            context.abort(grpc.StatusCode.INTERNAL, "inference failed on the server")
        requested = [o.name for o in request.outputs] or list(outputs)
        response = pb.ModelInferResponse(
            model_name=served.manifest.name, model_version=served.manifest.version, id=request.id
        )
        for name in requested:
            if name not in outputs:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown output {name!r}")
            array = outputs[name]
            response.outputs.add(name=name, datatype=datatype_of(array), shape=list(array.shape))
            response.raw_output_contents.append(to_raw(array))
        served.stats.success += 1
        served.stats.success_ns += time.perf_counter_ns() - start
        served.stats.last_ms = int(time.time() * 1000)
        return response

    def ModelStatistics(self, request: Any, context: grpc.ServicerContext) -> Any:
        response = pb.ModelStatisticsResponse()
        for served in self.repository.loaded():
            m, s = served.manifest, served.stats
            if (request.name and request.name != m.name) or (request.version and request.version != m.version):
                continue
            stats = response.model_stats.add(
                name=m.name,
                version=m.version,
                last_inference=s.last_ms,
                inference_count=s.success,
                execution_count=s.success,
            )
            stats.inference_stats.success.count, stats.inference_stats.success.ns = s.success, s.success_ns
            stats.inference_stats.fail.count = s.fail
        return response


def start_inference_server(
    repository: ModelRepository, host: str, port: int, version: str, workers: int = 16
) -> tuple[grpc.Server, int]:
    """Start the OIP gRPC server; returns it with the bound port (``port=0`` picks a free one)."""
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options)
    add_servicer(InferenceServicer(repository, version), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port}; choose another with --grpc-port")
    server.start()
    return server, bound
