"""The optional prediction cache: LRU over (model, version, a hash of the inputs' bytes)."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np

Outputs = dict[str, np.ndarray]


class PredictionCache:
    """Thread-safe; cached outputs are read-only (they are shared by every later hit)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[str, str, bytes], Outputs] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(model: str, version: str, inputs: dict[str, np.ndarray]) -> tuple[str, str, bytes]:
        digest = hashlib.blake2b(digest_size=16)
        for name in sorted(inputs):
            array = np.ascontiguousarray(inputs[name])
            digest.update(f"{name}|{array.dtype}|{array.shape}".encode())
            digest.update(array.data)
        return model, version, digest.digest()

    def get(self, model: str, version: str, inputs: dict[str, np.ndarray]) -> Outputs | None:
        key = self.key(model, version, inputs)
        with self._lock:
            outputs = self._entries.get(key)
            if outputs is not None:
                self._entries.move_to_end(key)
            return outputs

    def put(self, model: str, version: str, inputs: dict[str, np.ndarray], outputs: Outputs) -> None:
        for array in outputs.values():
            array.flags.writeable = False
        key = self.key(model, version, inputs)
        with self._lock:
            self._entries[key] = outputs
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
