"""LiteRT / TFLite: ``ai_edge_litert`` when installed, else ``tflite_runtime``.

An interpreter is not thread-safe, so calls are serialised by a lock; input shapes are resized on
demand (dynamic batch). Converters name tensors their own way (``serving_default_args_0``), so the
manifest's input and output names map to the interpreter's tensors by order."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from device_profiles import DeviceProfile
from edge_agent.protocol.manifest import Manifest


def load_interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise ImportError("TFLite artifacts need LiteRT: pip install 'edgefed[tflite]'") from None
    return Interpreter


class LiteRtSession:
    def __init__(self, directory: Path, manifest: Manifest, profile: DeviceProfile | None = None) -> None:
        self.manifest = manifest
        threads = min(profile.cpu_cores, os.cpu_count() or 1) if profile else None
        self.interpreter = load_interpreter_class()(model_path=str(directory / "model.tflite"), num_threads=threads)
        self.interpreter.allocate_tensors()
        self._lock = threading.Lock()
        self._refresh()

    def _refresh(self) -> None:
        inputs = sorted(self.interpreter.get_input_details(), key=lambda d: d["index"])
        outputs = sorted(self.interpreter.get_output_details(), key=lambda d: d["index"])
        by_name = {d["name"]: d for d in inputs}
        self.inputs = {s.name: by_name.get(s.name, d) for s, d in zip(self.manifest.inputs, inputs, strict=False)}
        self.outputs = [(s.name, d) for s, d in zip(self.manifest.outputs, outputs, strict=False)]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            resized = False
            for name, array in inputs.items():
                detail = self.inputs[name]
                if tuple(detail["shape"]) != array.shape:
                    self.interpreter.resize_tensor_input(detail["index"], list(array.shape))
                    resized = True
            if resized:
                self.interpreter.allocate_tensors()
                self._refresh()
            for name, array in inputs.items():
                self.interpreter.set_tensor(self.inputs[name]["index"], array)
            self.interpreter.invoke()
            return {name: self.interpreter.get_tensor(d["index"]).copy() for name, d in self.outputs}
