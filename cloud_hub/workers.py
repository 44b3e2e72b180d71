"""More processes serving the hub's OIP gRPC port: one Python process tops out at about one core
(the GIL), so ``cloud-hub serve --inference-processes N`` (N > 1) starts N worker processes that all
listen on the same port (gRPC sets SO_REUSEPORT; the kernel spreads connections), and the hub's own
process keeps to the control plane and admin API.

Each worker opens the hub's registry (SQLite in WAL mode, or the --registry PostgreSQL database) and
artifact store read-mostly, loads its own ONNX Runtime sessions (every model at start, new ones within
2 s of registration), resolves tokens itself
and writes its usage counts to the registry every 2 s and on exit. The hub's ``invalidate`` reaches
every worker through a shared generation counter. A worker that dies is restarted; workers stop
within 2 s when the hub's process is gone, even killed.
``ModelStatistics`` adds up every worker: each writes its counts to ``worker-stats/{pid}.json`` in
the state directory every 2 s and on exit, and the one that serves the call adds the others' files
to its live counts (a worker that dies loses at most its last 2 s; the hub clears them at start).
"""

from __future__ import annotations

import logging
import multiprocessing
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from cloud_hub.accounting import UsageCounter, peer_statistics, write_statistics
from cloud_hub.artifacts import ArtifactLocation, Artifacts, open_artifacts
from cloud_hub.inference import (
    InferenceOptions,
    InferenceServer,
    InferenceServicer,
    ModelRepository,
    TokenOwners,
)
from cloud_hub.registry import Registry, open_registry
from device_profiles import get_profile
from edge_agent.protocol.signing import TrustStore

log = logging.getLogger(__name__)
USAGE_FLUSH_S = 2.0
STATS_DIR = "worker-stats"
_SPAWN = multiprocessing.get_context("spawn")  # no fork: the hub's threads and gRPC core must not be copied


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to serve like the hub does (picklable)."""

    state_dir: Path
    serving_profile: str
    version: str
    address: str
    options: InferenceOptions
    log_level: int
    artifacts: ArtifactLocation = field(default_factory=ArtifactLocation)  # serve --artifacts
    registry: str | None = None  # serve --registry (a postgresql:// URL); None: STATE/registry.db


def open_store(
    state_dir: Path, artifacts: ArtifactLocation | None = None, registry_url: str | None = None
) -> tuple[Registry, Artifacts]:
    """The hub's registry (``registry_url``: a postgresql:// URL, else ``STATE/registry.db``) and its artifact
    store (``STATE/artifacts`` unless ``artifacts``)."""
    registry = open_registry(registry_url or str(state_dir / "registry.db"))
    trust = TrustStore.from_dir(state_dir / "trust")
    return registry, open_artifacts(artifacts or ArtifactLocation(), state_dir, trust)


def free_port(host: str) -> int:
    """A port nothing listens on now (for ``--grpc-port 0`` with several processes)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _worker_main(spec: WorkerSpec, generation: Any, ready: Event) -> None:
    logging.basicConfig(level=spec.log_level, format="%(asctime)s hub-worker %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the hub stops its workers itself
    registry, store = open_store(spec.state_dir, spec.artifacts, spec.registry)
    repository = ModelRepository(registry, store, get_profile(spec.serving_profile), spec.options, generation)
    usage = UsageCounter()
    stats_dir = spec.state_dir / STATS_DIR
    servicer = InferenceServicer(repository, spec.version, usage, TokenOwners(registry),
                                 lambda: peer_statistics(stats_dir))  # fmt: skip
    repository.warm()
    server = InferenceServer(servicer, spec.address, spec.options)
    ready.set()
    warmed = generation.value
    hub = multiprocessing.parent_process()
    while not stop.wait(USAGE_FLUSH_S):
        usage.flush_to(registry)
        write_statistics(stats_dir, repository.statistics())
        if hub is not None and not hub.is_alive():
            log.warning("the hub process is gone: this inference worker stops")
            break
        if generation.value != warmed:  # an artifact was registered: load it here too
            warmed = generation.value
            repository.warm()
    server.stop(grace_s=2)
    usage.flush_to(registry)
    write_statistics(stats_dir, repository.statistics())


class InferenceWorkers:
    """``count`` worker processes serving ``spec.address``; started once each has loaded every model
    and bound the port, restarted when one dies, stopped (SIGTERM, 2 s grace for calls in flight)."""

    def __init__(self, spec: WorkerSpec, count: int, generation: Any, start_timeout_s: float = 300) -> None:
        self.spec, self.generation = spec, generation
        shutil.rmtree(spec.state_dir / STATS_DIR, ignore_errors=True)  # statistics start with the hub
        (spec.state_dir / STATS_DIR).mkdir()
        self.restarts = 0
        self._stopping = threading.Event()
        started = [self._spawn() for _ in range(count)]
        self.processes = [process for process, _ in started]
        self._ready = [ready for _, ready in started]  # held: a child unpickles its event after start()
        deadline = time.monotonic() + start_timeout_s
        for process, ready in started:
            while not ready.wait(0.1):
                if not process.is_alive() or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"an inference worker did not start (exit code {process.exitcode}); see its log lines "
                        f"above: is {spec.address} free? (--grpc-port)"
                    )
        threading.Thread(target=self._supervise, name="edgefed-workers", daemon=True).start()

    def _spawn(self) -> tuple[BaseProcess, Event]:
        ready = _SPAWN.Event()
        process = _SPAWN.Process(target=_worker_main, args=(self.spec, self.generation, ready),
                                 name="edgefed-inference-worker", daemon=True)  # fmt: skip
        process.start()
        return process, ready

    def _supervise(self) -> None:
        while not self._stopping.wait(1.0):
            for index, process in enumerate(self.processes):
                if not process.is_alive() and not self._stopping.is_set():
                    log.warning("inference worker %d exited with %s; restarting it", process.pid, process.exitcode)
                    self.processes[index], self._ready[index] = self._spawn()
                    self.restarts += 1

    def stop(self) -> None:
        self._stopping.set()
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
