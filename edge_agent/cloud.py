"""Cloud route: an Open Inference Protocol gRPC client (the hub's server, Triton or KServe)."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from edge_agent.config import parse_endpoint
from edge_agent.errors import CloudUnavailable, InputMismatch, ModelNotDeployed
from edge_agent.protocol.oip import InferenceStub, pb
from edge_agent.protocol.oip.tensors import datatype_of, from_contents, from_raw, to_raw

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class CloudClient:
    """A thread-safe client over one gRPC channel; every call carries a deadline."""

    def __init__(self, endpoint: str, timeout_s: float = 2.0) -> None:
        host, port = parse_endpoint(endpoint, "grpc", "cloud", 8001)
        self.endpoint, self.timeout_s = endpoint, timeout_s
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        self.channel = grpc.insecure_channel(f"{host}:{port}", options=options)
        self.stub: Any = InferenceStub(self.channel)

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
            response = self.stub.ModelInfer(request, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            if code == grpc.StatusCode.NOT_FOUND:
                raise ModelNotDeployed(f"cloud {self.endpoint}: {details}") from None
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InputMismatch("-", "inputs the cloud model accepts", details or "rejected") from None
            raise CloudUnavailable(f"cloud {self.endpoint}: {code.name} {details}") from None
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
