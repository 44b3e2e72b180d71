"""Open Inference Protocol (KServe v2) gRPC stubs, generated from grpc_predict_v2.proto (`make proto`)."""

from edge_agent.protocol.oip import grpc_predict_v2_pb2 as pb
from edge_agent.protocol.oip import grpc_predict_v2_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
