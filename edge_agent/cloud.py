"""Cloud route: an Open Inference Protocol gRPC client (the hub's server, Triton or KServe)."""

from __future__ import annotations

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


class CloudClient:
    """A thread-safe client over one gRPC channel; every call carries a deadline.

    ``grpc://host:port`` is plaintext, ``grpcs://host:port`` TLS (``ca_file`` or the system roots).
    ``device_id`` and ``token`` travel as ``x-edgefed-device`` and ``authorization: Bearer`` metadata.
    """

    def __init__(
        self, endpoint: str, timeout_s: float = 2.0, *, device_id: str | None = None, token: str | None = None,
        ca_file: str | None = None,
    ) -> None:  # fmt: skip
        secure = endpoint.startswith("grpcs://")
        host, port = parse_endpoint(endpoint.replace("grpcs://", "grpc://", 1), "grpc", "cloud", 8001)
        self.endpoint, self.timeout_s = endpoint, timeout_s
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
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

    def infer(
        self, model: str, inputs: dict[str, np.ndarray], version: str = "", timeout_s: float | None = None
    ) -> tuple[str, dict[str, np.ndarray]]:
        """(version that answered, outputs). Raises ModelNotDeployed, InputMismatch or CloudUnavailable."""
        request = pb.ModelInferRequest(model_name=model, model_version=version)
        for name, array in inputs.items():
            array = np.asarray(array)
            request.inputs.add(name=name, datatype=datatype_of(array), shape=list(array.shape))
            request.raw_input_contents.append(to_raw(array))
        try:
            response = self.stub.ModelInfer(request, timeout=timeout_s or self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            if code == grpc.StatusCode.NOT_FOUND:
                raise ModelNotDeployed(f"cloud {self.endpoint}: {details}") from None
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InputMismatch("-", "inputs the cloud model accepts", details or "rejected") from None
            raise CloudUnavailable(f"cloud {self.endpoint}: {code.name} {details}", code in RETRYABLE) from None
        return response.model_version, decode_outputs(response)

    def close(self) -> None:
        self.channel.close()


def decode_outputs(response: Any) -> dict[str, np.ndarray]:
    outputs = {}
    for index, tensor in enumerate(response.outputs):
        shape = list(tensor.shape)
        if index < len(response.raw_output_contents):
            outputs[tensor.name] = from_raw(response.raw_output_contents[index], tensor.datatype, shape)
        else:
            outputs[tensor.name] = from_contents(tensor.contents, tensor.datatype, shape)
    return outputs
