"""EdgeClient: the SDK edge apps call. Local inference first, cloud when no local model can answer."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import numpy as np

from device_profiles import DeviceProfile, get_profile
from edge_agent.cloud import CloudClient
from edge_agent.config import AgentConfig, default_state_dir
from edge_agent.errors import ConfigError, InferenceFailed, InputMismatch, ModelNotDeployed
from edge_agent.runtime import Runtime, open_runtime, validate_inputs
from edge_agent.store import ActiveRecord, ModelStore
from edge_agent.telemetry import SPOOL_FILE, CallRecord, Spool, TelemetryRecorder

POINTER_CHECK_INTERVAL_S = 0.005


@dataclass(frozen=True)
class InferResult:
    outputs: dict[str, np.ndarray]
    model: str
    version: str
    route: str  # "local" or "cloud"
    latency_ms: float
    reason: str = ""  # why this route answered


@dataclass(frozen=True)
class ModelInfo:
    name: str
    active_version: str | None
    versions: tuple[str, ...]


@dataclass
class _Loaded:
    record: ActiveRecord
    runtime: Runtime
    pointer_stamp: tuple[int, int]
    checked_at: float = field(default=0.0)


class EdgeClient:
    """Thread-safe in-process inference over the device's model store.

    ``EdgeClient()`` reads the state directory the agent wrote (``EDGEFED_STATE_DIR`` or the default);
    ``cloud`` overrides the agent's cloud endpoint (``grpc://host:port``) and ``cloud=False`` disables it.
    """

    def __init__(
        self,
        state_dir: str | Path | None = None,
        *,
        cloud: str | bool | None = None,
        cloud_timeout_s: float = 2.0,
        telemetry: bool = True,
        allow_cast: bool = False,
    ) -> None:
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        config = self._config()
        self.profile: DeviceProfile | None = get_profile(config.profile) if config else None
        self.store = ModelStore(self.state_dir / "models")
        self.allow_cast = allow_cast
        endpoint = cloud if isinstance(cloud, str) else (config.cloud if config and cloud is not False else None)
        self._cloud = CloudClient(endpoint, cloud_timeout_s) if endpoint else None
        self._recorder = TelemetryRecorder(Spool(self.state_dir / SPOOL_FILE)) if telemetry else None
        self._loaded: dict[str, _Loaded] = {}
        self._lock = threading.Lock()

    def _config(self) -> AgentConfig | None:
        try:
            return AgentConfig.load(self.state_dir)
        except ConfigError:
            if (self.state_dir / "agent.json").exists():
                raise
            return None

    def _pointer_stamp(self, name: str) -> tuple[int, int] | None:
        try:
            st = os.stat(self.store.active_path(name))
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def _local(self, name: str) -> _Loaded | None:
        """The loaded runtime for the active version, re-checking the pointer at most every few ms."""
        loaded, now = self._loaded.get(name), time.monotonic()
        if loaded is not None and now - loaded.checked_at < POINTER_CHECK_INTERVAL_S:
            return loaded
        stamp = self._pointer_stamp(name)
        if loaded is not None and stamp == loaded.pointer_stamp:
            loaded.checked_at = now
            return loaded
        with self._lock:
            return self._load(name, stamp)

    def _load(self, name: str, stamp: tuple[int, int] | None) -> _Loaded | None:
        record = self.store.active(name) if stamp else None
        if record is None:
            self._loaded.pop(name, None)
            return None
        current = self._loaded.get(name)
        if current is not None and current.record == record:
            current.pointer_stamp, current.checked_at = stamp or (0, 0), time.monotonic()
            return current
        directory = self.store.version_dir(name, record.version)
        runtime = open_runtime(directory, self.store.manifest(name, record.version), self.profile)
        loaded = _Loaded(record, runtime, stamp or (0, 0), time.monotonic())
        self._loaded[name] = loaded
        return loaded

    def infer(self, model: str, inputs: dict[str, np.ndarray] | np.ndarray) -> InferResult:
        """Run ``model`` locally when a version is active, else on the cloud route."""
        start = time.perf_counter()
        loaded = self._local(model)
        if isinstance(inputs, np.ndarray):
            inputs = self._single_input(model, inputs, loaded)
        if loaded is not None:
            try:
                checked = validate_inputs(loaded.runtime.manifest, inputs, self.allow_cast)
                outputs = loaded.runtime.run(checked)
                return self._done(model, loaded.record.version, "local", outputs, start, "active locally")
            except InputMismatch:
                self._record(model, loaded.record.version, "local", start, ok=False)
                raise
            except Exception as exc:
                self._record(model, loaded.record.version, "local", start, ok=False)
                if self._cloud is None:
                    raise InferenceFailed(f"{model}@{loaded.record.version}: {exc}") from exc
                return self._cloud_infer(model, inputs, start, f"local runtime failed: {exc}")
        if self._cloud is None:
            raise ModelNotDeployed(f"{model} is not installed in {self.state_dir} and no cloud endpoint is set")
        return self._cloud_infer(model, inputs, start, "no local version")

    def _single_input(self, model: str, array: np.ndarray, loaded: _Loaded | None) -> dict[str, np.ndarray]:
        if loaded is None or len(loaded.runtime.manifest.inputs) != 1:
            raise InputMismatch("-", f"a dict of named inputs for {model}", "a bare array")
        return {loaded.runtime.manifest.inputs[0].name: array}

    def _cloud_infer(self, model: str, inputs: dict[str, np.ndarray], start: float, reason: str) -> InferResult:
        assert self._cloud is not None
        try:
            version, outputs = self._cloud.infer(model, inputs)
        except Exception:
            self._record(model, "", "cloud", start, ok=False)
            raise
        return self._done(model, version, "cloud", outputs, start, reason)

    def _done(
        self, model: str, version: str, route: str, outputs: dict[str, np.ndarray], start: float, reason: str
    ) -> InferResult:
        latency_ms = self._record(model, version, route, start, ok=True)
        return InferResult(outputs, model, version, route, latency_ms, reason)

    def _record(self, model: str, version: str, route: str, start: float, ok: bool) -> float:
        latency_ms = (time.perf_counter() - start) * 1000
        if self._recorder is not None:
            self._recorder.record(CallRecord(time.time(), model, version, route, latency_ms, ok))
        return latency_ms

    def models(self) -> list[ModelInfo]:
        """Installed models with their active version."""
        infos = []
        for name in self.store.names():
            active = self.store.active(name)
            versions = tuple(m.version for m in self.store.versions(name))
            infos.append(ModelInfo(name, active.version if active else None, versions))
        return infos

    def close(self) -> None:
        if self._recorder is not None:
            self._recorder.close()
        if self._cloud is not None:
            self._cloud.close()

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
