"""Test support: a small fleet of real agents in this process (each with its own state dir and MQTT
connection to the hub's broker) and an app on each device calling the SDK at a steady rate."""

from __future__ import annotations

import shutil
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from cloud_hub.desired_signing import HUB_KEY_DIR, HUB_KEY_NAME
from edge_agent import EdgeClient
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
from edge_agent.desired_guard import install_hub_key
from edge_agent.errors import EdgefedError
from edge_agent.protocol.messages import LATENCY_EDGES_MS


class Device:
    def __init__(self, root: Path, device_id: str, broker: str, keys: tuple[Path, Path], group: str,
                 hub_key: bytes, telemetry_interval_s: float = 0.2) -> None:  # fmt: skip
        self.device_id, self.state = device_id, root / device_id
        (self.state / "trust").mkdir(parents=True)
        shutil.copy(keys[1], self.state / "trust")
        install_hub_key(self.state, hub_key)  # as enrollment does: the hub's signed rollbacks are honoured
        AgentConfig(
            device_id=device_id, profile="x86-64-generic", broker=broker, telemetry_interval_s=telemetry_interval_s
        ).save(self.state)
        self.agent = Agent(self.state, AgentConfig.load(self.state))
        self.agent_thread = threading.Thread(target=self.agent.run, daemon=True)
        self.agent_thread.start()
        self.group = group
        self.calls = self.errors = 0
        self._stop = threading.Event()
        self._app: threading.Thread | None = None

    def start_app(self, model: str, rate: float = 150.0) -> None:
        """Calls ``model`` about ``rate`` times a second with N(0, 1) rows until ``stop``."""
        self._app = threading.Thread(target=self._run_app, args=(model, rate), daemon=True)
        self._app.start()

    def _run_app(self, model: str, rate: float) -> None:
        rng = np.random.default_rng(abs(hash(self.device_id)) % 2**32)
        with EdgeClient(self.state) as client:
            while not self._stop.wait(1.0 / rate):
                try:
                    client.infer(model, {"input": rng.standard_normal((1, 32)).astype(np.float32)})
                    self.calls += 1
                except EdgefedError:  # no model yet, or a failing version: the telemetry counts it
                    self.errors += 1

    def stop_app(self) -> None:
        """The app stops calling (the agent runs on); ``start_app`` starts it again."""
        self._stop.set()
        if self._app is not None:
            self._app.join(timeout=10)
        self._app, self._stop = None, threading.Event()

    def stop(self) -> None:
        self.stop_app()
        self.agent.stop_event.set()
        self.agent_thread.join(timeout=10)

    def active_version(self, model: str) -> str | None:
        active = self.agent.store.active(model)
        return active.version if active is not None else None


def wait_until(what: str, check: object, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def start_fleet(hub: Any, root: Path, keys: tuple[Path, Path], count: int, group: str = "fleet",
                telemetry_interval_s: float = 0.2) -> list[Device]:  # fmt: skip
    """``count`` devices recorded as enrollment records them (profile, ``group``), each a real agent holding
    the hub's public key (so it follows signed rollbacks)."""
    hub_key = (hub.config.state_dir / HUB_KEY_DIR / f"{HUB_KEY_NAME}.pub").read_bytes()
    devices = []
    for i in range(count):
        hub.registry.upsert_device(f"dev-{i:02d}", profile="x86-64-generic", groups=[group])
        devices.append(Device(root, f"dev-{i:02d}", hub.broker_url, keys, group, hub_key, telemetry_interval_s))
    return devices


def installed_versions(device: Device, model: str) -> set[str]:
    """The versions of ``model`` in the device's store: every version it installed (a rollback keeps them)."""
    return {m.version for m in device.agent.store.versions(model)}


def hub_reports(hub: Any, device_id: str, model: str) -> tuple[str | None, str | None]:
    """(version, state) of ``model`` in the device's reported state as the hub's registry holds it."""
    models = (hub.registry.device(device_id)["reported"] or {}).get("models", [])
    found = [(m.get("version"), m.get("state")) for m in models if m["name"] == model]
    return found[0] if found else (None, None)


def latency_ms(registry: Any, model: str) -> dict[str, dict[str, float]]:
    """Per version of ``model``, what the SDK measured around each local call, from its telemetry: the mean
    and the median and p95 of the latency histograms (the mean is at the mercy of a few stalled calls)."""
    from cloud_hub.metrics import quantile_ms

    total: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    hist: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(len(LATENCY_EDGES_MS) + 1, np.int64))
    for row in registry.telemetry():
        for w in row["windows"]:
            if w["model"] == model and w["route"] == "local" and w["count"]:
                total[w["version"]] += w["latency_ms_sum"]
                calls[w["version"]] += w["count"]
                hist[w["version"]] += np.asarray(w["latency_hist"], np.int64)
    return {v: {"mean": total[v] / calls[v], "p50": quantile_ms(hist[v].tolist(), 0.5),
                "p95": quantile_ms(hist[v].tolist(), 0.95)} for v in calls}  # fmt: skip
