"""Bounded messages (issue 11, observation 6): a desired state names at most MAX_DESIRED_MODELS models
and a reported state is at most MAX_REPORTED_BYTES. Both are checked at both ends: the hub refuses a
deploy past the limit, the device refuses (and reports) a desired state past it and cuts a report that
would be too big, and the hub marks a too-big report as refused instead of dropping it silently."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import make_artifact, wait_for
from test_hub_restarts import RunningAgent, admin, known, state_of

from cloud_hub.api_client import HubError
from cloud_hub.server import Hub
from edge_agent.mqtt import MqttConnection
from edge_agent.protocol import messages
from edge_agent.protocol.errors import MessageError
from edge_agent.protocol.messages import (
    MAX_DESIRED_MODELS,
    MAX_ERROR_CHARS,
    MAX_REPORTED_BYTES,
    DesiredModel,
    DesiredState,
    ReportedModel,
    ReportedState,
    from_wire,
    reported_to_wire,
    to_wire,
)
from edge_agent.protocol.topics import Topics


def desired_payload(count: int) -> bytes:
    """A desired state naming ``count`` models, made by hand (``DesiredState`` refuses to make it)."""
    models = [{"name": f"m{i}", "version": "1", "artifact_id": f"{i:064x}", "manifest": {}, "signature": {}}
              for i in range(count)]  # fmt: skip
    return json.dumps({"deployment_id": "d", "issued_at": "now", "models": models}).encode()


def big_report(models: int) -> ReportedState:
    failed = [ReportedModel(f"model-{i}", "failed", "1.0.0", f"{i:064x}", "x" * 900) for i in range(models)]
    return ReportedState("dev-1", "x86-64-generic", "1", "now", tuple(failed))


def test_a_desired_state_past_the_model_limit_is_refused_when_made_and_when_read() -> None:
    model = DesiredModel("m", "1", "0" * 64, {}, {})
    DesiredState("d", "now", (model,) * MAX_DESIRED_MODELS)
    with pytest.raises(MessageError, match=f"over the limit of {MAX_DESIRED_MODELS} per device"):
        DesiredState("d", "now", (model,) * (MAX_DESIRED_MODELS + 1))
    with pytest.raises(MessageError, match=r"DesiredState\.models: 5000 models"):
        from_wire(DesiredState, desired_payload(5_000))


def test_a_report_too_big_is_refused_by_to_wire_and_from_wire_and_cut_with_a_reason() -> None:
    report = big_report(400)
    with pytest.raises(MessageError, match=f"over the limit of {MAX_REPORTED_BYTES} bytes"):
        to_wire(report)
    raw = json.dumps({**json.loads(to_wire(big_report(1))), "models": [json.loads(to_wire(report.models[0]))] * 400})
    with pytest.raises(MessageError, match="ReportedState: message of"):
        from_wire(ReportedState, raw.encode())
    cut = from_wire(ReportedState, reported_to_wire(report))  # what the device sends instead
    assert 100 < len(cut.models) < 400 and cut.models == report.models[: len(cut.models)]
    assert cut.error is not None and f"report cut to {len(cut.models)} of 400 models" in cut.error
    assert reported_to_wire(big_report(3)) == to_wire(big_report(3))  # a report that fits is left alone


def test_errors_in_reports_are_cut_to_a_bounded_length() -> None:
    assert messages.short_error("e" * 50) == "e" * 50
    cut = messages.short_error("e" * 50_000)
    assert len(cut) == MAX_ERROR_CHARS and cut.endswith("(truncated)")


def reported(connection: MqttConnection, device_id: str = "dev-1") -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    connection.route(Topics().reported(device_id), lambda _t, payload: seen.append(json.loads(payload)))
    return seen


def test_the_device_refuses_an_oversized_desired_state_reports_why_and_keeps_serving(
    hub: Hub, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    broker = hub.broker_url
    agent = RunningAgent(tmp_path / "agent", broker, keys)
    spy = MqttConnection(broker)
    spy.start()
    try:
        wait_for("the hub to know the device", lambda: known(hub))
        admin(hub).add_artifact(make_artifact(tmp_path / "gemm", keys[0]))
        deployment = admin(hub).deploy("gemm", "1.0.0", "device:dev-1")["deployment_id"]
        wait_for("gemm active", lambda: state_of(hub, deployment) == "active")
        seen = reported(spy)
        spy.publish(Topics().desired("dev-1"), desired_payload(MAX_DESIRED_MODELS + 1), retain=True)
        report = wait_for("a report naming the refusal", lambda: next((r for r in seen if r["error"]), None))
        assert f"desired state refused: DesiredState.models: {MAX_DESIRED_MODELS + 1} models" in report["error"]
        assert [(m["name"], m["state"]) for m in report["models"]] == [("gemm", "active")]  # still serving
        active = agent.agent.store.active("gemm")
        assert active is not None and active.version == "1.0.0"
        device = admin(hub).request("GET", "/v1/devices/dev-1")
        assert "desired state refused" in device["reported"]["error"]
    finally:
        spy.stop()
        agent.stop()


def test_the_hub_refuses_a_deploy_past_the_model_limit_naming_the_device(
    hub: Hub, tmp_path: Path, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(messages, "MAX_DESIRED_MODELS", 1)
    agent = RunningAgent(tmp_path / "agent", hub.broker_url, keys)
    try:
        wait_for("the hub to know the device", lambda: known(hub))
        for name in ("gemm", "other"):
            admin(hub).add_artifact(make_artifact(tmp_path / name, keys[0], name=name))
        admin(hub).deploy("gemm", "1.0.0", "device:dev-1")
        admin(hub).deploy("gemm", "1.0.0", "device:dev-1")  # the same model again: still one
        with pytest.raises(HubError, match=r"cannot deploy other@1\.0\.0 to dev-1: DesiredState\.models: 2 models"):
            admin(hub).deploy("other", "1.0.0", "device:dev-1")
        assert [d["name"] for d in admin(hub).request("GET", "/v1/deployments")] == ["gemm", "gemm"]
    finally:
        agent.stop()


def test_the_hub_marks_a_report_it_refuses_and_the_deployment_fails_with_the_reason(
    hub: Hub, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    agent = RunningAgent(tmp_path / "agent", hub.broker_url, keys)
    try:
        wait_for("the hub to know the device", lambda: known(hub))
        agent.stop()  # an older or broken agent sends what the hub must refuse
        admin(hub).add_artifact(make_artifact(tmp_path / "gemm", keys[0]))
        deployment = admin(hub).deploy("gemm", "1.0.0", "device:dev-1")["deployment_id"]
        rogue = MqttConnection(hub.broker_url)
        rogue.start()
        models = [{"name": "x" * 1000, "state": "active"}] * 300
        raw = json.dumps({**json.loads(to_wire(big_report(1))), "models": models})
        rogue.publish(Topics().reported("dev-1"), raw.encode(), retain=True)
        states = lambda: admin(hub).request("GET", f"/v1/deployments/{deployment}")["states"]["dev-1"]  # noqa: E731
        state = wait_for("the deployment to fail", lambda: states() if states()["state"] == "failed" else None)
        assert "report refused by the hub: ReportedState: message of" in state["error"]
        rogue.stop()
    finally:
        agent.stop()
