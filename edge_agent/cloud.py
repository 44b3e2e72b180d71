"""Cloud route: an Open Inference Protocol gRPC client (the hub's server, Triton or KServe).

Calls go over Triton's ``ModelStreamInfer`` bidirectional stream when the server offers it (the hub
and Triton do): a message on an open stream costs about two thirds of a unary call in Python gRPC.
Each calling thread borrows a stream of its own from a pool, so responses need no matching; a
watchdog cancels a stream whose call outlives its deadline. A server without the stream (KServe)
answers UNIMPLEMENTED once, and the client uses unary ``ModelInfer`` from then on.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from edge_agent.config import parse_endpoint
from edge_agent.errors import CloudUnavailable, InputMismatch, ModelNotDeployed
from edge_agent.protocol.oip import InferenceStub, pb
from edge_agent.protocol.oip.tensors import datatype_of, from_contents, from_raw, to_raw

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
_CLOSE = object()


class _Stream:
    """One open ModelStreamInfer call, used by one thread at a time."""

    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self.requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.responses = stub.ModelStreamInfer(iter(self.requests.get, _CLOSE), metadata=metadata)
        self.deadline = 0.0
        self.expired = False

    def call(self, request: Any) -> Any:
        self.requests.put(request)
        return next(self.responses)

    def close(self) -> None:
        self.requests.put(_CLOSE)
        self.responses.cancel()


class _Watchdog:
    """Cancels streams whose call has outlived its deadline (checked every 5 ms)."""

    def __init__(self) -> None:
        self.watched: dict[int, _Stream] = {}
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="edgefed-cloud-deadlines", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            now = time.monotonic()
            for stream in list(self.watched.values()):
                if stream.deadline and now > stream.deadline:
                    stream.expired = True
                    stream.responses.cancel()

    def stop(self) -> None:
        self._stop.set()


class CloudClient:
    """A thread-safe client over one gRPC channel; every call carries a deadline.

    ``grpc://host:port`` is plaintext, ``grpcs://host:port`` TLS (``ca_file`` or the system roots).
    ``device_id`` and ``token`` travel as ``x-edgefed-device`` and ``authorization: Bearer`` metadata.
    """

    def __init__(
        self, endpoint: str, timeout_s: float = 2.0, *, device_id: str | None = None, token: str | None = None,
        ca_file: str | None = None, streaming: bool = True,
    ) -> None:  # fmt: skip
        secure = endpoint.startswith("grpcs://")
        host, port = parse_endpoint(endpoint.replace("grpcs://", "grpc://", 1), "grpc", "cloud", 8001)
        self.endpoint, self.timeout_s, self.streaming = endpoint, timeout_s, streaming
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # gRPC's default reconnect backoff grows to 2 minutes: a recovered cloud would sit unused
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if secure:
            roots = Path(ca_file).read_bytes() if ca_file else None
            self.channel = grpc.secure_channel(f"{host}:{port}", grpc.ssl_channel_credentials(roots), options=options)
        else:
            self.channel = grpc.insecure_channel(f"{host}:{port}", options=options)
        self.stub: Any = InferenceStub(self.channel)
        self.metadata = tuple(
            (k, v) for k, v in (("x-edgefed-device", device_id), ("authorization", token and f"Bearer {token}")) if v
        )
        self._idle: queue.SimpleQueue[_Stream] = queue.SimpleQueue()
        self._watchdog: _Watchdog | None = None
        self._lock = threading.Lock()

    def infer(
        self, model: str, inputs: dict[str, np.ndarray], version: str = "", timeout_s: float | None = None
    ) -> tuple[str, dict[str, np.ndarray]]:
        """(version that answered, outputs). Raises ModelNotDeployed, InputMismatch or CloudUnavailable."""
        request = pb.ModelInferRequest(model_name=model, model_version=version)
        for name, array in inputs.items():
            array = np.asarray(array)
            request.inputs.add(name=name, datatype=datatype_of(array), shape=list(array.shape))
            request.raw_input_contents.append(to_raw(array))
        timeout = timeout_s or self.timeout_s
        response = self._over_stream(request, timeout) if self.streaming else None
        if response is None:
            try:
                response = self.stub.ModelInfer(request, timeout=timeout, metadata=self.metadata)
            except grpc.RpcError as exc:
                raise _mapped(self.endpoint, exc.code(), exc.details() or "") from None
        return response.model_version, decode_outputs(response)

    def _over_stream(self, request: Any, timeout_s: float) -> Any | None:
        """The response over a pooled stream; None when the server has no stream (then use unary)."""
        try:
            stream = self._idle.get_nowait()
        except queue.Empty:
            stream = _Stream(self.stub, self.metadata)
        watchdog = self._watchdog or self._start_watchdog()
        stream.deadline = time.monotonic() + timeout_s
        watchdog.watched[id(stream)] = stream
        try:
            reply = stream.call(request)
        except (grpc.RpcError, StopIteration) as exc:
            stream.close()
            code = exc.code() if isinstance(exc, grpc.RpcError) else grpc.StatusCode.UNAVAILABLE
            if code == grpc.StatusCode.UNIMPLEMENTED:
                self.streaming = False
                return None
            if stream.expired:
                raise _mapped(
                    self.endpoint, grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer in {timeout_s:.3f} s"
                ) from None
            details = exc.details() if isinstance(exc, grpc.RpcError) else "stream closed"
            raise _mapped(self.endpoint, code, details or "") from None
        finally:
            watchdog.watched.pop(id(stream), None)
        stream.deadline = 0.0
        self._idle.put(stream)
        if reply.error_message:
            name, _, details = reply.error_message.partition(": ")
            raise _mapped(self.endpoint, getattr(grpc.StatusCode, name, grpc.StatusCode.UNKNOWN), details)
        return reply.infer_response

    def _start_watchdog(self) -> _Watchdog:
        with self._lock:
            if self._watchdog is None:
                self._watchdog = _Watchdog()
            return self._watchdog

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
        while not self._idle.empty():
            self._idle.get_nowait().close()
        self.channel.close()


def _mapped(endpoint: str, code: grpc.StatusCode, details: str) -> Exception:
    if code == grpc.StatusCode.NOT_FOUND:
        return ModelNotDeployed(f"cloud {endpoint}: {details}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InputMismatch("-", "inputs the cloud model accepts", details or "rejected")
    return CloudUnavailable(f"cloud {endpoint}: {code.name} {details}", code in RETRYABLE)


def decode_outputs(response: Any) -> dict[str, np.ndarray]:
    outputs = {}
    for index, tensor in enumerate(response.outputs):
        shape = list(tensor.shape)
        if index < len(response.raw_output_contents):
            outputs[tensor.name] = from_raw(response.raw_output_contents[index], tensor.datatype, shape)
        else:
            outputs[tensor.name] = from_contents(tensor.contents, tensor.datatype, shape)
    return outputs
