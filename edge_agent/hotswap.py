"""The active version of each model in this process, followed as the agent switches it (hot swap).

The active pointer is stat()-ed at most every 5 ms per model; the first version of a model is loaded
and warmed on the first call, a new one in a background thread, swapped in with one assignment while
calls in flight finish on the runtime they started with.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from device_profiles import DeviceProfile
from edge_agent.ab import Splits, open_version
from edge_agent.protocol.sketch import Sketch
from edge_agent.runtimes import InputValidator, Runtime, open_runtime, zero_inputs
from edge_agent.store import ActiveRecord, ModelStore

log = logging.getLogger(__name__)
POINTER_CHECK_INTERVAL_S = 0.005


@dataclass(frozen=True)
class Loaded:
    record: ActiveRecord
    runtime: Runtime
    validator: InputValidator
    reference: Sketch | None


@dataclass
class Slot:
    loaded: Loaded | None = None
    stamp: tuple[int, int] | None = None
    checked_at: float = 0.0
    loading: bool = False
    swaps: int = field(default=0)


def _warm_up(name: str, runtime: Runtime) -> None:
    """A first version's warm-up: one call on zeros (empty strings for BYTES), so lazy initialisation
    never lands on a caller; a failure is logged and left to the calls themselves (they fall back or
    raise as the policy says). A swapped-in version must pass it or the current one stays."""
    try:
        runtime.run(zero_inputs(runtime.manifest.inputs))
    except Exception as exc:
        log.warning("warm-up call of %s@%s failed: %s", name, runtime.manifest.version, exc)


class ActiveModels:
    """Loaded versions by model name; ``get`` is the per-call path (a dict lookup and a clock read)."""

    def __init__(self, store: ModelStore, profile: DeviceProfile | None, engines_dir: Path) -> None:
        self.store, self.profile, self.engines_dir = store, profile, engines_dir
        self.slots: dict[str, Slot] = {}
        self._loaders: list[threading.Thread] = []
        self._lock = threading.Lock()
        # A/B tests (ab.py): ``splits.by_model`` holds a model's B side only while a test runs on the device
        self.splits = Splits(store, functools.partial(open_version, store, profile, engines_dir))

    def loaded(self, name: str) -> Loaded | None:
        """What is loaded now, without looking at the pointer."""
        slot = self.slots.get(name)
        return slot.loaded if slot is not None else None

    def close(self) -> None:
        for loader in self._loaders:  # a runtime must not be torn down mid-construction at exit
            loader.join(timeout=30)
        self.splits.close()

    def _pointer_stamp(self, name: str) -> tuple[int, int] | None:
        try:
            st = os.stat(self.store.active_path(name))
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def get(self, name: str) -> Loaded | None:
        slot = self.slots.get(name)
        now = time.monotonic()
        if slot is not None and now - slot.checked_at < POINTER_CHECK_INTERVAL_S:
            return slot.loaded
        return self._refresh(name, now)

    def _refresh(self, name: str, now: float) -> Loaded | None:
        self.splits.refresh(name)  # an A/B test started or ended (ab.json)
        stamp = self._pointer_stamp(name)
        with self._lock:
            slot = self.slots.setdefault(name, Slot())
            if stamp != slot.stamp and not slot.loading:
                self._follow(name, slot, stamp)
            slot.checked_at = now  # last: the lock-free fast path trusts a fresh check only once resolved
            return slot.loaded

    def _follow(self, name: str, slot: Slot, stamp: tuple[int, int] | None) -> None:
        """React to a changed active pointer (called with the lock held)."""
        record = self.store.active(name) if stamp else None
        if record is None:
            slot.loaded, slot.stamp = None, stamp
        elif slot.loaded is not None and slot.loaded.record == record:
            slot.stamp = stamp
        elif slot.loaded is None:
            slot.loaded, slot.stamp = self._open(name), stamp
            if slot.loaded is not None:
                _warm_up(name, slot.loaded.runtime)
        else:
            slot.loading = True
            loader = threading.Thread(target=self._swap, args=(name, slot, stamp), daemon=True)
            self._loaders = [t for t in self._loaders if t.is_alive()] + [loader]
            loader.start()

    def _open(self, name: str) -> Loaded | None:
        """Load the active version under the store's shared lock, so no process prunes it meanwhile."""
        with self.store.locked(shared=True):
            record = self.store.active(name)
            if record is None:
                return None
            directory = self.store.version_dir(name, record.version)
            manifest = self.store.manifest(name, record.version)
            runtime = open_runtime(directory, manifest, self.profile, self.engines_dir)
        return Loaded(record, runtime, InputValidator(manifest), Sketch.load(directory))

    def _swap(self, name: str, slot: Slot, stamp: tuple[int, int]) -> None:
        """Load and warm the new version off the caller's path, then switch in one assignment."""
        try:
            loaded = self._open(name)
            if loaded is not None:
                loaded.runtime.run(zero_inputs(loaded.runtime.manifest.inputs))  # warm, or stay on the current one
        except Exception:
            log.exception("could not load the new active version of %s; staying on the current one", name)
            loaded = None
        with self._lock:
            if loaded is not None:
                slot.loaded = loaded
                slot.swaps += 1
            slot.stamp, slot.loading = stamp, False
