"""Test support: a small fleet of real agents in this process (each with its own state dir and MQTT
connection to the hub's broker) and an app on each device calling the SDK at a steady rate."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np

from edge_agent import EdgeClient
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
from edge_agent.desired_guard import install_hub_key
from edge_agent.errors import EdgefedError


class Device:
    def __init__(self, root: Path, device_id: str, broker: str, keys: tuple[Path, Path], group: str,
                 hub_key: bytes) -> None:  # fmt: skip
        self.device_id, self.state = device_id, root / device_id
        (self.state / "trust").mkdir(parents=True)
        shutil.copy(keys[1], self.state / "trust")
        install_hub_key(self.state, hub_key)  # as enrollment does: the hub's signed rollbacks are honoured
        AgentConfig(device_id=device_id, profile="x86-64-generic", broker=broker, telemetry_interval_s=0.2).save(
            self.state
        )
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

    def stop(self) -> None:
        self._stop.set()
        if self._app is not None:
            self._app.join(timeout=10)
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
