"""Open Inference Protocol (KServe v2) gRPC: message classes and the service glue.

The message classes are built at import from ``grpc_predict_v2.desc``, the descriptor set that
grpcio-tools' protoc produces from ``grpc_predict_v2.proto`` (``make proto``), into a descriptor pool
of our own. Not using the default pool (as generated ``*_pb2.py`` modules do) is deliberate: Triton's
and KServe's Python clients register the very same ``inference.*`` names there, which makes two
generated modules refuse to load in one process, and generated modules also pin the protobuf runtime
to the generator's version (tritonclient needs protobuf < 7). Built this way the SDK and the hub work
next to ``tritonclient`` on any protobuf from 4.21 on, and stay wire-compatible: same package, service,
method names and field numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVICE = "inference.GRPCInferenceService"
_REGISTERED: dict[str, Any] = {"_registered_method": True}  # grpcio >= 1.62: less per-call work
METHODS = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStatistics",
)
STREAM_METHOD = "ModelStreamInfer"  # Triton's bidirectional extension

_pool = descriptor_pool.DescriptorPool()
for _file in descriptor_pb2.FileDescriptorSet.FromString(
    (Path(__file__).with_name("grpc_predict_v2.desc")).read_bytes()
).file:
    _pool.Add(_file)


def _message(name: str) -> Any:
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"inference.{name}"))


pb = SimpleNamespace(
    **{
        name: _message(name)
        for name in (
            "ServerLiveRequest", "ServerLiveResponse", "ServerReadyRequest", "ServerReadyResponse",
            "ModelReadyRequest", "ModelReadyResponse", "ServerMetadataRequest", "ServerMetadataResponse",
            "ModelMetadataRequest", "ModelMetadataResponse", "ModelInferRequest", "ModelInferResponse",
            "InferParameter", "InferTensorContents", "ModelStatisticsRequest", "ModelStatisticsResponse",
            "ModelStatistics", "InferStatistics", "StatisticDuration", "ModelStreamInferResponse",
        )
    }
)  # fmt: skip


def _types(method: str) -> tuple[Any, Any]:
    service = _pool.FindServiceByName(SERVICE)
    rpc = service.methods_by_name[method]
    return (message_factory.GetMessageClass(rpc.input_type), message_factory.GetMessageClass(rpc.output_type))


class InferenceStub:
    """Client side: one callable per RPC, e.g. ``stub.ModelInfer(request, timeout=1.0)``."""

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel) -> None:
        request, response = _types(STREAM_METHOD)
        self.ModelStreamInfer: Any = channel.stream_stream(
            f"/{SERVICE}/{STREAM_METHOD}", request_serializer=request.SerializeToString,
            response_deserializer=response.FromString, **_REGISTERED,
        )  # fmt: skip
        for method in METHODS:
            request, response = _types(method)
            setattr(self, method, channel.unary_unary(
                f"/{SERVICE}/{method}", request_serializer=request.SerializeToString,
                response_deserializer=response.FromString, **_REGISTERED,
            ))  # fmt: skip

    def __getattr__(self, name: str) -> Callable[..., Any]:
        raise AttributeError(name)


def add_servicer(servicer: object, server: grpc.Server | grpc.aio.Server) -> None:
    """Serve the RPCs: a method named like each RPC, ``(request, context)``; ``ModelStreamInfer`` takes
    ``(request_iterator, context)`` and yields responses."""
    handlers = {}
    request, response = _types(STREAM_METHOD)
    handlers[STREAM_METHOD] = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer, request_deserializer=request.FromString,  # type: ignore[attr-defined]
        response_serializer=response.SerializeToString,
    )  # fmt: skip
    for method in METHODS:
        request, response = _types(method)
        handlers[method] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method), request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )  # fmt: skip
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


__all__ = ["METHODS", "SERVICE", "STREAM_METHOD", "InferenceStub", "add_servicer", "pb"]
