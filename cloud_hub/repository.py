"""The models the hub's inference server answers with: which artifact serves a (name, version) on this
hub's serving profile, loaded once per artifact with its validator, batcher and statistics."""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud_hub.accounting import Statistics
from cloud_hub.artifacts import Artifacts
from cloud_hub.batching import Batcher
from cloud_hub.errors import NotFound
from cloud_hub.registry import Registry
from device_profiles import DeviceProfile
from edge_agent.protocol.errors import ArtifactRejected
from edge_agent.protocol.manifest import Manifest, manifest_from_wire
from edge_agent.runtimes import InputValidator
from edge_agent.runtimes.onnxruntime import OnnxRuntimeSession
from edge_agent.store import check_compatible

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceOptions:
    """Flags of `cloud-hub serve` that shape inference."""

    max_batch_rows: int = 32  # 1 disables dynamic batching
    batch_delay_ms: float = 0.0  # 0: batch only what is already queued (no added latency when idle)
    queue_size: int = 256  # per model; beyond it RESOURCE_EXHAUSTED
    workers: int = 64  # concurrent RPCs served at once (with queue_size, the cap before RESOURCE_EXHAUSTED)
    processes: int = 1  # processes serving the gRPC port (SO_REUSEPORT); each has its own sessions
    intra_op_threads: int = 0  # ONNX Runtime threads per session; 0: the CPUs divided among the processes
    require_token: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None


@dataclass
class Stats:
    success: int = 0
    fail: int = 0
    success_ns: int = 0
    last_ms: int = 0


@dataclass
class Served:
    manifest: Manifest
    session: OnnxRuntimeSession
    validator: InputValidator
    batcher: Batcher | None
    stats: Stats = field(default_factory=Stats)


class ModelRepository:
    """Picks and loads the artifact that answers for (name, version) on this hub: the one compiled for
    ``serving_profile`` (the profile of the machine the hub runs on), else one that profile can run
    (a CPU artifact for the same arch and an ONNX Runtime runtime, as an agent would accept).

    A version is a registered version name or, Triton-style, an integer release number; an empty
    version means the newest version this hub can serve. ``generation`` is a counter shared with the
    other serving processes (a ``multiprocessing`` RawValue): ``invalidate`` bumps it, and every
    repository that shares it re-resolves.
    """

    def __init__(self, registry: Registry, store: Artifacts, serving_profile: DeviceProfile,
                 options: InferenceOptions | None = None, generation: Any = None) -> None:  # fmt: skip
        self.registry, self.store, self.profile = registry, store, serving_profile
        self.options = options or InferenceOptions()
        self.generation = generation if generation is not None else multiprocessing.get_context("spawn").RawValue("Q")
        self._seen = self.generation.value
        self._served: dict[str, Served] = {}
        self._resolved: dict[tuple[str, str], Served] = {}  # (name, version asked) → what answers it
        self._lock = threading.Lock()

    def invalidate(self) -> None:
        """Forget name/version resolutions here and in every process sharing ``generation``; call
        after registering an artifact."""
        self.generation.value += 1

    def servable(self, manifest: dict[str, Any]) -> bool:
        """Whether this hub's ONNX Runtime can serve the artifact on its serving profile."""
        if not str(manifest["runtime"]).startswith("onnxruntime"):
            return False
        try:
            check_compatible(manifest_from_wire(manifest), self.profile)
        except ArtifactRejected:
            return False
        return True

    def registered(self, name: str, version: str) -> list[dict[str, Any]]:
        """The artifacts of ``name`` at ``version`` (a version name, a release number, or "" for all);
        NotFound naming the registered versions when there are none."""
        rows = self.registry.artifacts(name)
        if not rows:
            raise NotFound(f"model {name} is not registered")
        if not version:
            return rows
        wanted = [r for r in rows if r["version"] == version]
        if not wanted and version.isdigit():  # a Triton-style integer version: a release number
            wanted = [r for r in rows if r["release"] == int(version)]
        if not wanted:
            raise NotFound(f"model {name}@{version} is not registered (versions: "
                           f"{', '.join(sorted({r['version'] for r in rows}))})")  # fmt: skip
        return wanted

    def pick(self, name: str, version: str) -> dict[str, Any]:
        """The manifest (wire form) of the artifact that answers for (name, version) here; NotFound saying
        what to do when no artifact of it is servable on this hub's profile."""
        rows = self.registered(name, version)
        manifests = [self.registry.artifact(r["artifact_id"])["manifest"] for r in rows]  # newest release first
        servable = [m for m in manifests if self.servable(m)]
        if not servable:
            label = f"{name}@{version}" if version else name
            built_for = ", ".join(sorted({m["hardware"]["profile"] for m in manifests}))
            raise NotFound(
                f"{label} has no artifact this hub can serve (built for {built_for}; the hub serves profile "
                f"{self.profile.id}): compile it with --profile {self.profile.id} and add it with "
                "'cloud-hub models add'"
            )
        newest = [m for m in servable if m["release"] == servable[0]["release"]]
        return next((m for m in newest if m["hardware"]["profile"] == self.profile.id), newest[0])

    def get(self, name: str, version: str) -> Served:
        """The served model for (name, version); a dict lookup once resolved (the per-call path)."""
        if self.generation.value != self._seen:
            self._seen, self._resolved = self.generation.value, {}
        served = self._resolved.get((name, version))
        if served is not None:
            return served
        manifest = manifest_from_wire(self.pick(name, version))
        with self._lock:
            served = self._served.get(manifest.artifact_id) or self._load(manifest)
        self._resolved[(name, version)] = served
        return served

    def warm(self, names: list[str] | None = None) -> None:
        """Load the newest servable version of each model (all registered ones by default) before a call
        needs it: a first call would otherwise wait for the session to load (≈ 80 ms for the digits CNN)."""
        for name in names if names is not None else sorted({r["name"] for r in self.registry.artifacts()}):
            try:
                self.get(name, "")
            except NotFound as exc:
                log.warning("not serving %s: %s", name, exc)
            except Exception:
                log.exception("could not load %s ahead of its first call", name)

    def _load(self, manifest: Manifest) -> Served:
        threads = self.options.intra_op_threads or max(1, len(os.sched_getaffinity(0)) // self.options.processes)
        session = OnnxRuntimeSession(self.store.path(manifest.artifact_id), manifest, prefer_gpu=True,
                                     threads=threads, spinning=False)  # fmt: skip
        batchable = self.options.max_batch_rows > 1 and all(
            s.shape and isinstance(s.shape[0], str) for s in (*manifest.inputs, *manifest.outputs)
        )
        batcher = (
            Batcher(session.run, self.options.max_batch_rows, self.options.batch_delay_ms / 1000,
                    self.options.queue_size, manifest.name, offload=session.providers[0] != "CPUExecutionProvider")
            if batchable else None
        )  # fmt: skip
        served = Served(manifest, session, InputValidator(manifest), batcher)
        self._served[manifest.artifact_id] = served
        log.info("serving %s@%s with %s%s", manifest.name, manifest.version, session.providers[0],
                 " (dynamic batching)" if batcher else "")  # fmt: skip
        return served

    def loaded(self) -> list[Served]:
        return list(self._served.values())

    def statistics(self) -> Statistics:
        """(name, version) → [success, fail, success_ns, last_ms, executions] of this process."""
        rows = {}
        for served in self.loaded():
            s = served.stats
            executions = served.batcher.executions if served.batcher else s.success
            rows[(served.manifest.name, served.manifest.version)] = [s.success, s.fail, s.success_ns, s.last_ms,
                                                                     executions]  # fmt: skip
        return rows
