"""Cloud route: an Open Inference Protocol gRPC client (the hub's server, Triton or KServe).

Calls go over Triton's ``ModelStreamInfer`` bidirectional stream when the server offers it (the hub
and Triton do). Each calling thread borrows a stream from a pool (one per concurrent caller): a
``grpc.aio`` channel with an event loop of its own, which the calling thread runs itself for the
length of its call, so there is no hand-off to a request-writer thread and back as with the blocking
API's streams. Measured here against the same server: 0.39 ms per call vs 0.51 ms for a blocking
stream and 0.70 ms for ``tritonclient``'s unary call. A timer on that loop cancels a call that
outlives its deadline. A server without the stream (KServe) answers UNIMPLEMENTED once, and the
client uses unary ``ModelInfer`` from then on, as it does when called from a thread that is already
running an event loop (async apps should use ``EdgeClient.ainfer``).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from edge_agent.config import parse_endpoint
from edge_agent.errors import CloudUnavailable, InferenceFailed, InputMismatch, ModelNotDeployed
from edge_agent.protocol.manifest import Interface, TensorSpec
from edge_agent.protocol.oip import InferenceStub, pb
from edge_agent.protocol.oip.tensors import MANIFEST_DTYPES, datatype_of, from_contents, from_raw, to_raw

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


class _Stream:
    """An aio channel on an event loop of its own, and its current ModelStreamInfer call. Borrowed by
    one thread at a time, which runs the loop for the length of its call; after an error the next call
    opens a new stream on the same channel (and loop)."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]],
                 metadata: tuple[tuple[str, str], ...]) -> None:  # fmt: skip
        self.loop = asyncio.new_event_loop()
        self.metadata = metadata
        self.channel = self.loop.run_until_complete(self._open(target, credentials, options))
        self.method = InferenceStub(self.channel).ModelStreamInfer
        self.call: Any = None
        self.expired = False
        self.sent = False

    @staticmethod
    async def _open(target: str, credentials: grpc.ChannelCredentials | None,
                    options: list[tuple[str, Any]]) -> grpc.aio.Channel:  # fmt: skip
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, credentials, options=options)

    def roundtrip(self, request: Any, timeout_s: float) -> Any:
        """The reply to ``request``; raises AioRpcError, or CancelledError when the deadline passed.
        ``sent`` tells afterwards whether the request reached gRPC: a stream the server ended before
        the write (an aborted stream, a restarted server) fails the write with gRPC's own INTERNAL."""
        self.expired = self.sent = False
        return self.loop.run_until_complete(self._roundtrip(request, timeout_s))

    async def _roundtrip(self, request: Any, timeout_s: float) -> Any:
        if self.call is None:
            self.call = self.method(metadata=self.metadata)
        timer = self.loop.call_later(timeout_s, self._expire)
        try:
            await self.call.write(request)
            self.sent = True
            reply = await self.call.read()
        except BaseException:
            self.call.cancel()
            self.call = None
            raise
        finally:
            timer.cancel()
        if reply is grpc.aio.EOF:  # type: ignore[attr-defined]  # (grpc-stubs lag grpcio)
            self.call = None
        return reply

    def _expire(self) -> None:
        self.expired = True
        self.call.cancel()

    def close(self) -> None:
        if _running_loop() is not None:  # e.g. EdgeClient.close() inside an app's event loop: not this thread
            closer = threading.Thread(target=self.close, name="edgefed-stream-close")
            closer.start()
            closer.join()
            return
        if self.call is not None:
            self.call.cancel()
        self.loop.run_until_complete(self.channel.close(grace=None))
        self.loop.run_until_complete(asyncio.sleep(0.01))  # let gRPC deliver what it still has for this loop
        self.loop.close()


class CloudClient:
    """A thread-safe client; every call carries a deadline.

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
        self.target = f"{host}:{port}"
        self.options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # gRPC's default reconnect backoff grows to 2 minutes: a recovered cloud would sit unused
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        self.credentials = (
            grpc.ssl_channel_credentials(Path(ca_file).read_bytes() if ca_file else None) if secure else None
        )
        if self.credentials is not None:
            self.channel = grpc.secure_channel(self.target, self.credentials, options=self.options)
        else:
            self.channel = grpc.insecure_channel(self.target, options=self.options)
        self.stub: Any = InferenceStub(self.channel)
        self.metadata = tuple(
            (k, v) for k, v in (("x-edgefed-device", device_id), ("authorization", token and f"Bearer {token}")) if v
        )
        self._idle: queue.SimpleQueue[_Stream] = queue.SimpleQueue()  # at most one per concurrent caller
        self._closed = False

    def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        version: str = "",
        timeout_s: float | None = None,
        outputs: tuple[str, ...] | None = None,
    ) -> tuple[str, dict[str, np.ndarray]]:
        """(version that answered, outputs). ``outputs``: the interface's output names, asked for by name
        and used as the result's keys whatever the server calls them (KServe says ``output-0``).
        Raises ModelNotDeployed, InputMismatch, InferenceFailed or CloudUnavailable."""
        request = pb.ModelInferRequest(model_name=model, model_version=version)
        for name in outputs or ():
            request.outputs.add(name=name)
        for name, array in inputs.items():
            if type(array) is not np.ndarray:
                array = np.asarray(array)
            request.inputs.add(name=name, datatype=datatype_of(array), shape=array.shape)
            request.raw_input_contents.append(to_raw(array))
        timeout = timeout_s or self.timeout_s
        deadline = time.monotonic() + timeout
        response = self._over_stream(request, timeout) if self.streaming else None
        if response is None:
            try:
                remaining = max(deadline - time.monotonic(), 0.001)
                response = self.stub.ModelInfer(request, timeout=remaining, metadata=self.metadata)
            except grpc.RpcError as exc:
                raise _mapped(self.endpoint, exc.code(), exc.details() or "") from None
        answered = response.model_version or version  # KServe answers with an empty version
        return answered, named_outputs(decode_outputs(response), outputs, f"cloud {self.endpoint}: {model}")

    def interface(self, model: str, version: str = "", timeout_s: float | None = None) -> Interface | None:
        """The model's interface from the server's ModelMetadata (dynamic dimensions are ``-1`` there);
        None when the server has no ModelMetadata or describes no inputs (KServe's default)."""
        request = pb.ModelMetadataRequest(name=model, version=version)
        try:
            reply = self.stub.ModelMetadata(request, timeout=timeout_s or self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None
            raise _mapped(self.endpoint, exc.code(), exc.details() or "") from None
        if not reply.inputs:
            # KServe's Python ModelServer answers a model that does not override get_input_types with no
            # inputs (and no outputs): that describes nothing, it does not mean "takes no inputs"
            return None
        try:
            return Interface(tuple(_spec(t) for t in reply.inputs), tuple(_spec(t) for t in reply.outputs))
        except KeyError as exc:
            raise CloudUnavailable(f"cloud {self.endpoint}: {model} has a tensor of datatype {exc}") from None

    def _over_stream(self, request: Any, timeout_s: float) -> Any | None:
        """The response over a pooled stream; None when it cannot stream (then use unary)."""
        if _running_loop() is not None:
            return None  # this thread runs an event loop already: it cannot run ours
        try:
            stream = self._idle.get_nowait()
        except queue.Empty:
            stream = _Stream(self.target, self.credentials, self.options, self.metadata)
        try:
            reply = stream.roundtrip(request, timeout_s)
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
            self._release(stream)
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self.streaming = False
                return None
            if isinstance(exc, grpc.aio.AioRpcError) and not stream.sent:
                return None  # never sent: a unary call reports the server's real answer
            if isinstance(exc, grpc.aio.AioRpcError):
                raise _mapped(self.endpoint, exc.code(), exc.details() or "") from None
            if stream.expired:
                details = f"no answer in {timeout_s:.3f} s"
                raise _mapped(self.endpoint, grpc.StatusCode.DEADLINE_EXCEEDED, details) from None
            raise _mapped(self.endpoint, grpc.StatusCode.CANCELLED, "the call was cancelled") from None
        self._release(stream)
        if reply is grpc.aio.EOF:  # type: ignore[attr-defined]
            raise _mapped(self.endpoint, grpc.StatusCode.UNAVAILABLE, "the server closed the stream")
        if reply.error_message:
            name, _, details = reply.error_message.partition(": ")
            raise _mapped(self.endpoint, getattr(grpc.StatusCode, name, grpc.StatusCode.UNKNOWN), details)
        return reply.infer_response

    def _release(self, stream: _Stream) -> None:
        if self._closed:
            stream.close()
        else:
            self._idle.put(stream)

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channels; a stream in use closes when its call ends."""
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                break
        self.channel.close()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _mapped(endpoint: str, code: grpc.StatusCode, details: str) -> Exception:
    if code == grpc.StatusCode.NOT_FOUND:
        return ModelNotDeployed(f"cloud {endpoint}: {details}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InputMismatch("-", "inputs the cloud model accepts", details or "rejected")
    return CloudUnavailable(f"cloud {endpoint}: {code.name} {details}", code in RETRYABLE)


def _spec(tensor: Any) -> TensorSpec:
    shape = tuple(d if d >= 0 else ("batch" if axis == 0 else f"dim{axis}") for axis, d in enumerate(tensor.shape))
    return TensorSpec(tensor.name, MANIFEST_DTYPES[tensor.datatype], shape)


def named_outputs(outputs: dict[str, np.ndarray], names: tuple[str, ...] | None, what: str) -> dict[str, np.ndarray]:
    """The outputs under the interface's ``names``: by name when the server used them, else by position."""
    if not names or tuple(outputs) == names:
        return outputs
    if all(n in outputs for n in names):
        return {n: outputs[n] for n in names}
    if len(outputs) == len(names):
        return dict(zip(names, outputs.values(), strict=True))
    raise InferenceFailed(f"{what} answered outputs {list(outputs)}; its interface has {list(names)}")


def decode_outputs(response: Any) -> dict[str, np.ndarray]:
    outputs = {}
    raw = response.raw_output_contents
    for index, tensor in enumerate(response.outputs):
        shape = tensor.shape
        if index < len(raw):
            outputs[tensor.name] = from_raw(raw[index], tensor.datatype, shape)
        else:
            outputs[tensor.name] = from_contents(tensor.contents, tensor.datatype, shape)
    return outputs
