"""A/B tests on the device: the split file the agent writes and the SDK's traffic split (docs/ab.md).

    models/{name}/ab.json   {"ab_id", "a", "b", "b_artifact_id", "split"} while a test runs (write-fsync-rename)

The agent installs the B version beside the active (A) one, never activates it, and writes ``ab.json``
once B is installed and has passed its health check; it removes the file when the test stops or is
promoted. An SDK process follows the file as it follows the active pointer (stat()-ed at most every
5 ms per model): it loads B beside A and sends ``split`` percent of the calls to B. A call with a key
(``EdgeClient.infer(..., key=...)``) goes where the key's bucket says, the same on every call, device and
process: ``blake2b(key, key=ab_id) mod 10000 < split * 100``; a call without one is split at random.
A model with no test costs the caller one dict lookup.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent.protocol.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from collections.abc import Callable

    from device_profiles import DeviceProfile
    from edge_agent.hotswap import Loaded
    from edge_agent.store import ModelStore

    OpenVersion = Callable[[str, str], Loaded | None]

log = logging.getLogger(__name__)
AB_FILE = "ab.json"
BUCKETS = 10_000
Key = str | bytes | int


@dataclass(frozen=True)
class AbSpec:
    """One A/B test of a model on this device. ``split``: percent of calls to ``b`` (0 < split < 100)."""

    ab_id: str
    a: str
    b: str
    b_artifact_id: str
    split: float


def ab_path(store: ModelStore, name: str) -> Path:
    return store.model_dir(name) / AB_FILE


def read_ab(store: ModelStore, name: str) -> AbSpec | None:
    """The test the agent set up for ``name``; None when there is none (or the file is unreadable)."""
    try:
        data = json.loads(ab_path(store, name).read_bytes())
        return AbSpec(str(data["ab_id"]), str(data["a"]), str(data["b"]), str(data["b_artifact_id"]),
                      float(data["split"]))  # fmt: skip
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring %s: %s", ab_path(store, name), exc)
        return None


def write_ab(store: ModelStore, name: str, spec: AbSpec) -> None:
    atomic_write_bytes(ab_path(store, name), json.dumps(asdict(spec)).encode())


def clear_ab(store: ModelStore, name: str) -> bool:
    """Remove ``name``'s test; True when there was one."""
    try:
        os.unlink(ab_path(store, name))
    except FileNotFoundError:
        return False
    return True


def bucket(key: Key, ab_id: str) -> int:
    """The key's bucket in 0..9999 for test ``ab_id``: stable across calls, processes and devices."""
    data = key if isinstance(key, bytes) else str(key).encode()
    salt = ab_id.encode()[:64]
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=salt).digest(), "big") % BUCKETS


def goes_to_b(key: Key | None, ab_id: str, split: float) -> bool:
    """Whether a call (with ``key``, or None: at random) goes to B under a ``split`` percent test."""
    threshold = round(split * BUCKETS / 100)
    if key is None:
        return random.random() * BUCKETS < threshold
    return bucket(key, ab_id) < threshold


def open_version(store: ModelStore, profile: DeviceProfile | None, engines_dir: Path, name: str,
                 version: str) -> Loaded:  # fmt: skip
    """Load and warm an installed ``version`` that is not the active one (B), under the store's shared
    lock so no process prunes it meanwhile; StoreError when it is not installed."""
    from edge_agent.hotswap import Loaded  # (hotswap imports this module)
    from edge_agent.protocol.sketch import Sketch
    from edge_agent.runtimes import InputValidator, open_runtime, zero_inputs
    from edge_agent.store import ActiveRecord

    with store.locked(shared=True):
        manifest = store.manifest(name, version)
        directory = store.version_dir(name, version)
        runtime = open_runtime(directory, manifest, profile, engines_dir)
    runtime.run(zero_inputs(manifest.inputs))  # warm, so lazy initialisation never lands on a caller
    record = ActiveRecord(version, manifest.artifact_id, manifest.release)
    return Loaded(record, runtime, InputValidator(manifest), Sketch.load(directory))


class Split:
    """A test loaded in an SDK process: B's loaded version and where calls go."""

    __slots__ = ("_salt", "_threshold", "b", "spec")

    def __init__(self, spec: AbSpec, b: Loaded) -> None:
        self.spec, self.b = spec, b
        self._threshold = round(spec.split * BUCKETS / 100)
        self._salt = spec.ab_id.encode()[:64]

    def pick(self, a: Loaded | None, key: Key | None) -> Loaded | None:
        if key is None:
            to_b = random.random() * BUCKETS < self._threshold
        else:
            data = key if isinstance(key, bytes) else str(key).encode()
            digest = hashlib.blake2b(data, digest_size=8, key=self._salt).digest()
            to_b = int.from_bytes(digest, "big") % BUCKETS < self._threshold
        return self.b if to_b else a


class Splits:
    """The A/B tests an SDK process follows, by model name (``by_model``: what the call path reads).

    ``refresh`` runs on the pointer-check path (at most every 5 ms per model): it stat()s ``ab.json`` and,
    when it changed, loads the new B version — on the caller's thread the first time (as the first
    version of A is), in a background thread after that, keeping the current split meanwhile."""

    def __init__(self, store: ModelStore, open_version: OpenVersion) -> None:
        self.store, self.open_version = store, open_version
        self.by_model: dict[str, Split] = {}
        self._stamps: dict[str, tuple[int, int] | None] = {}
        self._loading: set[str] = set()
        self._lock = threading.Lock()
        self._loaders: list[threading.Thread] = []

    def refresh(self, name: str) -> None:
        try:
            st = os.stat(ab_path(self.store, name))
            stamp: tuple[int, int] | None = (st.st_ino, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            first = name not in self._stamps
            if (not first and stamp == self._stamps[name]) or name in self._loading:
                return
            self._stamps[name] = stamp
            spec = read_ab(self.store, name) if stamp is not None else None
            current = self.by_model.get(name)
            if spec is None:
                self.by_model.pop(name, None)
                return
            if current is not None and current.b.record.version == spec.b:
                self.by_model[name] = Split(spec, current.b)
                return
            self._loading.add(name)
        if first:
            self._load(name, spec)
        else:
            loader = threading.Thread(target=self._load, args=(name, spec), daemon=True)
            self._loaders = [t for t in self._loaders if t.is_alive()] + [loader]
            loader.start()

    def _load(self, name: str, spec: AbSpec) -> None:
        try:
            loaded = self.open_version(name, spec.b)
        except Exception:
            log.exception("could not load %s@%s (the B side of A/B test %s): every call stays on A",
                          name, spec.b, spec.ab_id)  # fmt: skip
            loaded = None
        with self._lock:
            self._loading.discard(name)
            if loaded is None:
                self.by_model.pop(name, None)
            else:
                self.by_model[name] = Split(spec, loaded)

    def close(self) -> None:
        for loader in self._loaders:
            loader.join(timeout=30)
