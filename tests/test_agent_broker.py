"""An agent whose broker cannot be reached says so (log and `edge-agent status`) and keeps trying;
it joins as soon as the broker is there (a device may boot before its network or broker)."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path

import pytest
from conftest import MosquittoProcess, free_port, wait_for
from typer.testing import CliRunner

from edge_agent.agent import Agent
from edge_agent.cli import app as agent_cli
from edge_agent.config import AgentConfig


def status(state: Path) -> dict:
    result = CliRunner().invoke(agent_cli, ["status", "--state-dir", str(state)])
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def test_an_unreachable_broker_is_logged_shown_and_retried(tmp_path: Path, keys: tuple[Path, Path],
                                                           caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    port = free_port()
    state = tmp_path / "device"
    (state / "trust").mkdir(parents=True)
    shutil.copy(keys[1], state / "trust")
    config = AgentConfig(device_id="dev-1", profile="x86-64-generic", broker=f"mqtt://127.0.0.1:{port}")
    config.save(state)
    assert status(state)["broker"] == {"connected": False, "error": "no agent has run here yet (edge-agent run)"}
    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt")
    agent = Agent(state, config)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    broker = None
    try:
        wait_for("the agent to report the unreachable broker",
                 lambda: "cannot reach" in str(status(state)["broker"].get("error")), 15)  # fmt: skip
        assert f"cannot reach the MQTT broker at 127.0.0.1:{port}; retrying" in caplog.text
        assert thread.is_alive()  # it did not give up
        broker = MosquittoProcess(tmp_path, port=port)
        wait_for("the agent to join the broker once it is up", lambda: status(state)["broker"]["connected"], 60)
    finally:
        agent.stop_event.set()
        thread.join(timeout=10)
        if broker is not None:
            broker.stop()
    assert status(state)["broker"]["error"] == "the agent stopped"
