"""KServe's Python ModelServer serving ONNX models through ONNX Runtime: the KServe peer of
tests/test_kserve_cloud.py and bench/cloud.py (started by tests/kserve_peer.py).

Runs in the separate `.kserve-venv` (`make .kserve-venv/.installed`: kserve pins its own dependencies),
so it imports nothing from edgefed. Each model is ``NAME=PATH``: an ``.onnx`` file, or a model directory
of a Triton repository as `cloud-hub export-triton` writes it (``DIR/NAME``: the newest numeric version
directory's ``model.onnx`` is served, as Triton's default version policy does). The session gets the
options the hub gives its own (one intra-op thread, no spinning), so bench/cloud.py compares servers,
not ONNX Runtime settings.

- ``--metadata`` answers ModelMetadata with the session's inputs and outputs; without it the model
  keeps KServe's default (no inputs, no outputs), as a custom KServe model that does not override
  ``get_input_types``/``get_output_types`` does.
- ``--output-names positional`` names the outputs ``output-0``, ``output-1``... (what some KServe
  runtimes answer) instead of the model's own names.
- ``--headers-log FILE`` appends the request headers (gRPC metadata) of each call as one JSON line,
  so a test can see what reached the model server (the SDK's ``authorization`` and ``x-edgefed-device``).

    python tests/kserve_server.py --grpc-port P --http-port Q [--metadata] NAME=PATH [NAME=PATH ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

# ONNX Runtime's type strings → the Open Inference Protocol's datatypes
DATATYPES = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64",
             "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
             "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
             "tensor(uint64)": "UINT64", "tensor(bool)": "BOOL", "tensor(string)": "BYTES"}  # fmt: skip


def model_file(path: Path) -> Path:
    """The ONNX file for ``path``: itself, or the newest numeric version of a Triton model directory."""
    if path.is_file():
        return path
    versions = sorted((int(p.name), p) for p in path.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise SystemExit(f"{path}: no numeric version directory (a Triton model directory has NAME/1/model.onnx)")
    return versions[-1][1] / "model.onnx"


def text(array: np.ndarray) -> np.ndarray:
    """BYTES elements (bytes) as the str ONNX Runtime's string tensors take (it would store repr(b"...))."""
    return np.vectorize(lambda b: b.decode() if isinstance(b, bytes) else b, otypes=[object])(array)


class OnnxModel(Model):  # type: ignore[misc]
    def __init__(self, name: str, path: Path, metadata: bool, positional: bool, headers_log: Path | None) -> None:
        super().__init__(name)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(model_file(path)), options, providers=["CPUExecutionProvider"])
        self.metadata, self.positional, self.headers_log = metadata, positional, headers_log
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_types = [DATATYPES[o.type] for o in self.session.get_outputs()]
        self.ready = True

    @staticmethod
    def _describe(tensors: list[Any]) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": DATATYPES[t.type],
                 "shape": [d if isinstance(d, int) else -1 for d in t.shape]} for t in tensors]  # fmt: skip

    def get_input_types(self) -> list[dict[str, Any]]:
        return self._describe(self.session.get_inputs()) if self.metadata else []

    def get_output_types(self) -> list[dict[str, Any]]:
        return self._describe(self.session.get_outputs()) if self.metadata else []

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> Any:
        if self.headers_log is not None:
            with self.headers_log.open("a") as log:
                log.write(json.dumps({"model": self.name, "version": payload.model_version or "",
                                      "headers": dict(headers or {})}) + "\n")  # fmt: skip
        feeds = {tensor.name: text(tensor.as_numpy()) if tensor.datatype == "BYTES" else tensor.as_numpy()
                 for tensor in payload.inputs}  # fmt: skip
        results = self.session.run(None, feeds)
        outputs = []
        for index, (name, datatype, result) in enumerate(
            zip(self.output_names, self.output_types, results, strict=True)
        ):
            array = np.asarray(result)
            output = InferOutput(name=f"output-{index}" if self.positional else name, shape=list(array.shape),
                                 datatype=datatype)  # fmt: skip
            output.set_data_from_numpy(array, binary_data=True)
            outputs.append(output)
        return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metadata", action="store_true", help="answer ModelMetadata with the model's tensors")
    parser.add_argument("--output-names", choices=("model", "positional"), default="model")
    parser.add_argument("--headers-log", type=Path)
    parser.add_argument("models", nargs="+", metavar="NAME=PATH")
    args = parser.parse_args()
    models = []
    for spec in args.models:
        name, _, path = spec.partition("=")
        models.append(OnnxModel(name, Path(path), args.metadata, args.output_names == "positional", args.headers_log))
    server = ModelServer(grpc_port=args.grpc_port, http_port=args.http_port, enable_latency_logging=False)
    server.start(models)


if __name__ == "__main__":
    sys.exit(main())
