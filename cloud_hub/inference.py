"""Cloud inference: the Open Inference Protocol (KServe v2) gRPC service over registered artifacts.

The server is ``grpc.aio`` on an event loop (uvloop when installed) of its own thread: measured here,
≈ 430 µs of CPU per request against ≈ 550-760 µs for the thread-pool server. More processes can serve
the same port (``cloud_hub.workers``, SO_REUSEPORT). Models are loaded lazily with ONNX Runtime (CUDA
EP first when this ORT build has it; on the CPU intra-op threads do not spin, as they share the cores
with gRPC work) and cached per artifact; requests for a model with a dynamic first axis go through its
Batcher. Every call honours the caller's deadline; message sizes are capped; TLS and per-device
bearer tokens are optional. Every answered call is counted per (device, model) for cost tracking.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from cloud_hub.accounting import Statistics, UsageCounter, merge_statistics
from cloud_hub.artifacts import ArtifactStore
from cloud_hub.batching import Batcher, QueueFull
from cloud_hub.errors import NotFound
from cloud_hub.registry import Registry
from device_profiles import DeviceProfile
from edge_agent.errors import InputMismatch
from edge_agent.protocol.errors import ArtifactRejected
from edge_agent.protocol.manifest import Manifest, manifest_from_wire
from edge_agent.protocol.oip import add_servicer, pb
from edge_agent.protocol.oip.tensors import OIP_DATATYPES, TensorError, datatype_of, from_contents, from_raw, to_raw
from edge_agent.runtimes import InputValidator
from edge_agent.runtimes.onnxruntime import OnnxRuntimeSession
from edge_agent.store import check_compatible

log = logging.getLogger(__name__)
SERVER_NAME = "edgefed-hub"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class InferenceOptions:
    """Flags of `cloud-hub serve` that shape inference."""

    max_batch_rows: int = 32  # 1 disables dynamic batching
    batch_delay_ms: float = 0.0  # 0: batch only what is already queued (no added latency when idle)
    queue_size: int = 256  # per model; beyond it RESOURCE_EXHAUSTED
    workers: int = 64  # concurrent RPCs served at once (with queue_size, the cap before RESOURCE_EXHAUSTED)
    processes: int = 1  # processes serving the gRPC port (SO_REUSEPORT); each has its own sessions
    intra_op_threads: int = 0  # ONNX Runtime threads per session; 0: the CPUs divided among the processes
    require_token: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None


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
    validator: InputValidator
    batcher: Batcher | None
    stats: _Stats = field(default_factory=_Stats)


class ModelRepository:
    """Picks and loads the artifact that answers for (name, version) on this hub: the one compiled for
    ``serving_profile`` (the profile of the machine the hub runs on), else one that profile can run
    (a CPU artifact for the same arch and an ONNX Runtime runtime, as an agent would accept).

    A version is a registered version name or, Triton-style, an integer release number; an empty
    version means the newest version this hub can serve. ``generation`` is a counter shared with the
    other serving processes (a ``multiprocessing`` RawValue): ``invalidate`` bumps it, and every
    repository that shares it re-resolves.
    """

    def __init__(self, registry: Registry, store: ArtifactStore, serving_profile: DeviceProfile,
                 options: InferenceOptions | None = None, generation: Any = None) -> None:  # fmt: skip
        self.registry, self.store, self.profile = registry, store, serving_profile
        self.options = options or InferenceOptions()
        self.generation = generation if generation is not None else multiprocessing.get_context("spawn").RawValue("Q")
        self._seen = self.generation.value
        self._served: dict[str, _Served] = {}
        self._resolved: dict[tuple[str, str], _Served] = {}  # (name, version asked) → what answers it
        self._lock = threading.Lock()

    def invalidate(self) -> None:
        """Forget name/version resolutions here and in every process sharing ``generation``; call
        after registering an artifact."""
        self.generation.value += 1

    def servable(self, manifest: dict[str, Any]) -> bool:
        """Whether this hub's ONNX Runtime can serve the artifact on its serving profile."""
        if not str(manifest["runtime"]).startswith("onnxruntime"):
            return False
        try:
            check_compatible(manifest_from_wire(manifest), self.profile)
        except ArtifactRejected:
            return False
        return True

    def _pick(self, name: str, version: str) -> dict[str, Any]:
        rows = self.registry.artifacts(name)
        if not rows:
            raise NotFound(f"model {name} is not registered")
        if version:
            wanted = [r for r in rows if r["version"] == version]
            if not wanted and version.isdigit():  # a Triton-style integer version: a release number
                wanted = [r for r in rows if r["release"] == int(version)]
            if not wanted:
                raise NotFound(f"model {name}@{version} is not registered (versions: "
                               f"{', '.join(sorted({r['version'] for r in rows}))})")  # fmt: skip
            rows = wanted
        manifests = [self.registry.artifact(r["artifact_id"])["manifest"] for r in rows]  # newest release first
        servable = [m for m in manifests if self.servable(m)]
        if not servable:
            label = f"{name}@{version}" if version else name
            built_for = ", ".join(sorted({m["hardware"]["profile"] for m in manifests}))
            raise NotFound(
                f"{label} has no artifact this hub can serve (built for {built_for}; the hub serves profile "
                f"{self.profile.id}): compile it with --profile {self.profile.id} and add it with "
                "'cloud-hub models add'"
            )
        newest = [m for m in servable if m["release"] == servable[0]["release"]]
        return next((m for m in newest if m["hardware"]["profile"] == self.profile.id), newest[0])

    def get(self, name: str, version: str) -> _Served:
        """The served model for (name, version); a dict lookup once resolved (the per-call path)."""
        if self.generation.value != self._seen:
            self._seen, self._resolved = self.generation.value, {}
        served = self._resolved.get((name, version))
        if served is not None:
            return served
        manifest = manifest_from_wire(self._pick(name, version))
        with self._lock:
            served = self._served.get(manifest.artifact_id) or self._load(manifest)
        self._resolved[(name, version)] = served
        return served

    def warm(self, names: list[str] | None = None) -> None:
        """Load the newest servable version of each model (all registered ones by default) before a call
        needs it: a first call would otherwise wait for the session to load (≈ 80 ms for the digits CNN)."""
        for name in names if names is not None else sorted({r["name"] for r in self.registry.artifacts()}):
            try:
                self.get(name, "")
            except NotFound as exc:
                log.warning("not serving %s: %s", name, exc)
            except Exception:
                log.exception("could not load %s ahead of its first call", name)

    def _load(self, manifest: Manifest) -> _Served:
        threads = self.options.intra_op_threads or max(1, len(os.sched_getaffinity(0)) // self.options.processes)
        session = OnnxRuntimeSession(self.store.path(manifest.artifact_id), manifest, prefer_gpu=True,
                                     threads=threads, spinning=False)  # fmt: skip
        batchable = self.options.max_batch_rows > 1 and all(
            s.shape and isinstance(s.shape[0], str) for s in (*manifest.inputs, *manifest.outputs)
        )
        batcher = (
            Batcher(session.run, self.options.max_batch_rows, self.options.batch_delay_ms / 1000,
                    self.options.queue_size, manifest.name, offload=session.providers[0] != "CPUExecutionProvider")
            if batchable else None
        )  # fmt: skip
        served = _Served(manifest, session, InputValidator(manifest), batcher)
        self._served[manifest.artifact_id] = served
        log.info("serving %s@%s with %s%s", manifest.name, manifest.version, session.providers[0],
                 " (dynamic batching)" if batcher else "")  # fmt: skip
        return served

    def loaded(self) -> list[_Served]:
        return list(self._served.values())

    def statistics(self) -> Statistics:
        """(name, version) → [success, fail, success_ns, last_ms, executions] of this process."""
        rows = {}
        for served in self.loaded():
            s = served.stats
            executions = served.batcher.executions if served.batcher else s.success
            rows[(served.manifest.name, served.manifest.version)] = [s.success, s.fail, s.success_ns, s.last_ms,
                                                                     executions]  # fmt: skip
        return rows


class TokenOwners:
    """The device each bearer token belongs to, from the registry (cached; tokens are only added)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._cache: dict[str, str | None] = {}

    def __call__(self, token: str) -> str | None:
        digest = token_hash(token)
        if self._cache.get(digest) is None:
            self._cache[digest] = self.registry.token_owner(digest)
        return self._cache[digest]


def _tensor_metadata(specs: Any) -> list[Any]:
    return [pb.ModelMetadataResponse.TensorMetadata(
        name=s.name, datatype=OIP_DATATYPES[s.dtype],
        shape=[d if isinstance(d, int) else -1 for d in s.shape]) for s in specs]  # fmt: skip


def decode_inputs(request: Any) -> dict[str, np.ndarray]:
    """A request's input tensors by name; BYTES become text (ONNX Runtime's strings), so bytes that are
    not UTF-8 are the caller's error, as is a name given twice."""
    inputs = {}
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise TensorError("raw_input_contents must hold one entry per input")
    for index, tensor in enumerate(request.inputs):
        if tensor.name in inputs:
            raise TensorError(f"input {tensor.name!r} is given twice")
        if raw:
            array = from_raw(raw[index], tensor.datatype, tensor.shape)
        else:
            array = from_contents(tensor.contents, tensor.datatype, tensor.shape)
        inputs[tensor.name] = _as_text(tensor.name, array) if tensor.datatype == "BYTES" else array
    return inputs


def _as_text(name: str, array: np.ndarray) -> np.ndarray:
    try:
        return np.array([item.decode() for item in array.reshape(-1)], dtype=object).reshape(array.shape)
    except UnicodeDecodeError:
        raise TensorError(f"input {name!r}: BYTES elements must be UTF-8 text for this model") from None


class RpcFailure(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code, self.message = code, message
        super().__init__(message)


class InferenceServicer:
    def __init__(self, repository: ModelRepository, version: str, usage: UsageCounter,
                 token_owner: Callable[[str], str | None],
                 peer_statistics: Callable[[], Statistics] | None = None) -> None:  # fmt: skip
        self.repository, self.version, self.usage = repository, version, usage
        self.token_owner = token_owner
        self.peer_statistics = peer_statistics  # the other inference processes' (workers.py)

    async def _device(self, context: Any) -> str:
        """The calling device: from its bearer token, else its (unauthenticated) x-edgefed-device header."""
        metadata = dict(context.invocation_metadata() or ())
        token = str(metadata.get("authorization", "")).removeprefix("Bearer ").strip()
        owner = self.token_owner(token) if token else None
        if owner is None and self.repository.options.require_token:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid device bearer token is required")
        return owner or str(metadata.get("x-edgefed-device", "anonymous"))

    async def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=["model_statistics"])

    async def _served(self, name: str, version: str, context: Any) -> _Served:
        try:
            return self.repository.get(name, version)
        except NotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        raise AssertionError("unreachable")

    async def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            self.repository.get(request.name, request.version)
        except NotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        manifest = (await self._served(request.name, request.version, context)).manifest
        versions = sorted({r["version"] for r in self.repository.registry.artifacts(request.name)})
        return pb.ModelMetadataResponse(name=manifest.name, versions=versions, platform="onnxruntime_onnx",
                                        inputs=_tensor_metadata(manifest.inputs),
                                        outputs=_tensor_metadata(manifest.outputs))  # fmt: skip

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        device = await self._device(context)
        remaining = context.time_remaining()  # None or huge when the caller set no deadline
        response = pb.ModelInferResponse()
        try:
            await self._infer(request, device, remaining if remaining is not None and remaining < 86400 else None,
                              response)  # fmt: skip
        except RpcFailure as failure:
            await context.abort(failure.code, failure.message)
        return response

    async def ModelStreamInfer(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        """Triton's bidirectional stream: one response per request, in order; a failed request answers
        with ``error_message`` (``CODE: message``) and the stream goes on."""
        device = await self._device(context)
        async for request in requests:
            reply = pb.ModelStreamInferResponse()
            try:
                await self._infer(request, device, None, reply.infer_response)  # filled in place: no copy
            except RpcFailure as failure:
                reply = pb.ModelStreamInferResponse(error_message=f"{failure.code.name}: {failure.message}",
                                                    infer_response=pb.ModelInferResponse(id=request.id))  # fmt: skip
            yield reply

    async def _infer(self, request: Any, device: str, timeout_s: float | None, response: Any) -> None:
        """Answer ``request`` into ``response`` (a ModelInferResponse); RpcFailure on any error."""
        try:
            served = self.repository.get(request.model_name, request.model_version)
        except NotFound as exc:
            raise RpcFailure(grpc.StatusCode.NOT_FOUND, str(exc)) from None
        start = time.perf_counter_ns()
        stats = served.stats
        try:
            inputs = served.validator(decode_inputs(request))
            batcher = served.batcher
            outputs = served.session.run(inputs) if batcher is None else await batcher.submit(inputs, timeout_s)
        except (TensorError, InputMismatch) as exc:
            stats.fail += 1
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except QueueFull as exc:
            stats.fail += 1
            raise RpcFailure(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"{served.manifest.name}: {exc}; retry with backoff"
            ) from None
        except TimeoutError as exc:
            stats.fail += 1
            raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)) from None
        except Exception:
            stats.fail += 1
            log.exception("inference failed for %s@%s", served.manifest.name, served.manifest.version)
            raise RpcFailure(grpc.StatusCode.INTERNAL, "inference failed on the server") from None
        response.model_name, response.model_version = served.manifest.name, served.manifest.version
        response.id = request.id
        for name in [o.name for o in request.outputs] or outputs:
            if name not in outputs:
                raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"unknown output {name!r}")
            array = outputs[name]
            response.outputs.add(name=name, datatype=datatype_of(array), shape=array.shape)
            response.raw_output_contents.append(to_raw(array))
        stats.success += 1
        stats.success_ns += time.perf_counter_ns() - start
        stats.last_ms = int(time.time() * 1000)
        self.usage.add(device, served.manifest.name)

    async def ModelStatistics(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.name and not self.repository.registry.artifacts(request.name, request.version or None):
            label = f"{request.name}@{request.version}" if request.version else request.name
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {label} is not registered")
        totals = self.peer_statistics() if self.peer_statistics else {}
        merge_statistics(totals, self.repository.statistics())
        response = pb.ModelStatisticsResponse()
        for (name, version), (success, fail, success_ns, last_ms, executions) in sorted(totals.items()):
            if (request.name and request.name != name) or (request.version and request.version != version):
                continue
            stats = response.model_stats.add(name=name, version=version, last_inference=last_ms,
                                             inference_count=success, execution_count=executions)  # fmt: skip
            stats.inference_stats.success.count, stats.inference_stats.success.ns = success, success_ns
            stats.inference_stats.fail.count = fail
        return response


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class InferenceServer:
    """The aio gRPC server on an event loop in its own thread."""

    def __init__(self, servicer: InferenceServicer, address: str, options: InferenceOptions) -> None:
        self.loop = _new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="edgefed-inference", daemon=True)
        self._thread.start()
        self.server, self.port = asyncio.run_coroutine_threadsafe(
            self._start(servicer, address, options), self.loop
        ).result(timeout=30)

    @staticmethod
    async def _start(servicer: InferenceServicer, address: str, options: InferenceOptions) -> tuple[Any, int]:
        grpc_options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]  # fmt: skip
        server = grpc.aio.server(options=grpc_options, maximum_concurrent_rpcs=options.workers + options.queue_size)
        add_servicer(servicer, server)
        if options.tls_cert and options.tls_key:
            credentials = grpc.ssl_server_credentials([(options.tls_key.read_bytes(), options.tls_cert.read_bytes())])
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen for gRPC on {address}; choose another with --grpc-port")
        await server.start()
        return server, port

    def stop(self, grace_s: float = 2.0) -> None:
        """Stop serving (idempotent): in-flight calls get ``grace_s`` to finish."""
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.server.stop(grace_s), self.loop).result(timeout=grace_s + 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when installed (≈ 10 % less CPU per call here), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def start_inference_server(repository: ModelRepository, host: str, port: int, version: str, usage: UsageCounter,
                           token_owner: Callable[[str], str | None]) -> InferenceServer:  # fmt: skip
    """Start the OIP gRPC server (``port=0`` picks a free one; the bound port is ``.port``)."""
    return InferenceServer(InferenceServicer(repository, version, usage, token_owner), f"{host}:{port}",
                           repository.options)  # fmt: skip
