"""The peer for bench/cloud.py: KServe's Python ModelServer serving an ONNX model through ONNX Runtime.

Runs in the separate `.bench-venv` (`make bench-venv`: kserve pins its own dependencies). The session
gets the options the hub gives its own (one intra-op thread per serving process, no spinning), so the
comparison is between the servers, not ONNX Runtime settings.
    python bench/kserve_server.py MODEL.onnx GRPC_PORT HTTP_PORT
"""

from __future__ import annotations

import sys
from typing import Any

import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


class OnnxModel(Model):  # type: ignore[misc]
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.ready = True

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> Any:
        x = payload.inputs[0].as_numpy()
        y = self.session.run(None, {payload.inputs[0].name: x})[0]
        output = InferOutput(name="output", shape=list(y.shape), datatype="FP32")
        output.set_data_from_numpy(y, binary_data=True)
        return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=[output])


if __name__ == "__main__":
    model = OnnxModel("digits-cnn", sys.argv[1])
    ModelServer(grpc_port=int(sys.argv[2]), http_port=int(sys.argv[3]), enable_latency_logging=False).start([model])
