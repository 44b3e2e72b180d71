"""Enrollment, group and tag deployments, deployment progress and device removal on a real Mosquitto,
plus the admin API's OpenAPI description and the systemd unit."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
from conftest import MosquittoProcess, make_artifact, wait_for
from typer.testing import CliRunner

from cloud_hub.api_client import AdminClient
from cloud_hub.errors import HubError
from cloud_hub.server import Hub, operator_token
from edge_agent.agent import Agent
from edge_agent.cli import app as agent_cli
from edge_agent.config import AgentConfig
from edge_agent.enroll import enroll
from edge_agent.errors import ConfigError
from edge_agent.store import ModelStore


def admin(hub: Hub) -> AdminClient:
    assert hub.admin is not None
    return AdminClient(f"http://127.0.0.1:{hub.admin.port}", operator_token(hub.config.state_dir))


def enroll_token(client: AdminClient, groups: list[str], tags: dict[str, str], ttl_s: float = 60) -> str:
    body = json.dumps({"groups": groups, "tags": tags, "ttl_s": ttl_s}).encode()
    return str(client.request("POST", "/v1/enroll-tokens", body)["token"])


def test_enroll_then_deploy_to_groups_and_tags(hub: Hub, tmp_path: Path, keys: tuple[Path, Path]) -> None:
    client = admin(hub)
    url = client.url
    for version, release in (("1.0.0", 1), ("2.0.0", 2)):
        client.add_artifact(make_artifact(tmp_path / f"gemm-{version}", keys[0], version=version, release=release))
    fleet = {
        "dev-a": (["lab"], {"site": "paris"}),
        "dev-b": (["lab"], {"site": "rome"}),
        "dev-c": ([], {"site": "paris"}),
    }
    agents = []
    for device, (groups, tags) in fleet.items():
        token = enroll_token(client, groups, tags)
        config = enroll(url, token, device, "x86-64-generic", tmp_path / device)
        assert config.cloud_token and config.broker == hub.broker_url and (tmp_path / device / "keyset.json").is_file()
        with pytest.raises(ConfigError, match=r"403.*already used"):
            enroll(url, token, "dev-z", "x86-64-generic", tmp_path / "dev-z")  # single use
        agent = Agent(tmp_path / device, AgentConfig.load(tmp_path / device))
        agents.append((agent, threading.Thread(target=agent.run, daemon=True)))
    expired = enroll_token(client, [], {}, ttl_s=0.01)
    time.sleep(0.05)
    with pytest.raises(ConfigError, match="expired"):
        enroll(url, expired, "dev-late", "x86-64-generic", tmp_path / "dev-late")
    for _, thread in agents:
        thread.start()
    try:
        wait_for("all online", lambda: sum(d["status"] == "online" for d in client.request("GET", "/v1/devices")) == 3)

        def active(device: str) -> str | None:
            record = ModelStore(tmp_path / device / "models").active("gemm")
            return record.version if record else None

        lab = client.deploy("gemm", "1.0.0", "group:lab")
        assert sorted(lab["devices"]) == ["dev-a", "dev-b"]
        wait_for("lab on 1.0.0", lambda: active("dev-a") == active("dev-b") == "1.0.0")
        wait_for("progress: all active", lambda: {s["state"] for s in client.request(
            "GET", f"/v1/deployments/{lab['deployment_id']}")["states"].values()} == {"active"})  # fmt: skip
        assert active("dev-c") is None
        paris = client.deploy("gemm", "2.0.0", "tag:site=paris")
        assert sorted(paris["devices"]) == ["dev-a", "dev-c"]
        wait_for("paris on 2.0.0", lambda: active("dev-a") == active("dev-c") == "2.0.0")
        assert active("dev-b") == "1.0.0"
        with pytest.raises(HubError, match=r"404.*no device matches"):
            client.deploy("gemm", "1.0.0", "group:nobody")
        with pytest.raises(HubError, match=r"400.*group:NAME"):
            client.deploy("gemm", "1.0.0", "fleet")
        agents[2][0].stop_event.set()  # decommission dev-c, then forget it
        agents[2][1].join(timeout=10)
        wait_for("dev-c offline", lambda: client.request("GET", "/v1/devices/dev-c")["status"] == "offline")
        client.request("DELETE", "/v1/devices/dev-c")
        assert [d["device_id"] for d in client.request("GET", "/v1/devices")] == ["dev-a", "dev-b"]
        client.request("DELETE", "/v1/devices/dev-b")  # still running: its own messages must not bring it back
        agents[1][0]._publish_reported()
        time.sleep(0.5)
        assert [d["device_id"] for d in client.request("GET", "/v1/devices")] == ["dev-a"]
        enroll(url, enroll_token(client, ["lab"], {}), "dev-b", "x86-64-generic", tmp_path / "dev-b-again")
        agents[1][0]._publish_reported()  # enrolled again: re-admitted, and its messages count again
        wait_for("dev-b reported", lambda: client.request("GET", "/v1/devices/dev-b")["reported"] is not None)
        audit = [r[0] for r in hub.registry.db.execute("SELECT action FROM audit").fetchall()]  # type: ignore[attr-defined]
        assert {"enroll", "deploy", "devices.remove", "devices.enroll-token"} <= set(audit)
    finally:
        for agent, thread in agents:
            agent.stop_event.set()
            thread.join(timeout=10)


def test_openapi_and_unauthenticated_requests(hub: Hub) -> None:
    client = admin(hub)
    public = AdminClient(client.url, "not-the-token")
    spec = public.request("GET", "/v1/openapi.json")
    assert spec["openapi"].startswith("3.") and "/v1/deployments" in spec["paths"] and "/v1/enroll" in spec["paths"]
    with pytest.raises(HubError, match="401"):
        public.request("GET", "/v1/devices")
    with pytest.raises(HubError, match=r"400.*token"):
        public.request("POST", "/v1/enroll", b"{}")


def test_install_service_dry_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        agent_cli, ["install-service", "--dry-run", "--user", "edge", "--state-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert (
        "ExecStart=" in result.output and f"ReadWritePaths={tmp_path}" in result.output and "User=edge" in result.output
    )
    unit = tmp_path / "edgefed-agent.service"
    result = CliRunner().invoke(agent_cli, ["install-service", "--unit-path", str(unit), "--state-dir", str(tmp_path)])
    assert result.exit_code == 0 and "Restart=always" in unit.read_text()


def test_malformed_messages_are_counted_and_the_hub_goes_on(hub: Hub, mosquitto: MosquittoProcess) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = admin(hub)
    noisy = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="noisy")
    noisy.connect("127.0.0.1", mosquitto.port)
    noisy.loop_start()
    for leaf, payload in (("telemetry", b"not json"), ("reported", b'{"device_id": 5}'), ("fetch", b"\xff\xfe")):
        noisy.publish(hub.topics.device("dev-x", leaf), payload, qos=1).wait_for_publish(5)
    noisy.publish(hub.topics.status("dev-y"), b'{"state": "online", "at": "2026-11-23T00:00:00Z"}', qos=1)
    wait_for("malformed counted", lambda: client.request("GET", "/v1/status")["malformed_messages"] == 3)
    wait_for("a good message still lands", lambda: [d["device_id"] for d in client.request("GET", "/v1/devices")]
             == ["dev-y"])  # fmt: skip
    noisy.loop_stop()


def test_deploy_refuses_an_artifact_over_the_profile_limit(
    hub: Hub, tmp_path: Path, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import ROOT

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    text = (ROOT / "device_profiles/profiles/x86-64-generic.toml").read_text()
    (profiles / "tiny-box.toml").write_text(
        text.replace('id = "x86-64-generic"', 'id = "tiny-box"').replace(
            "max_artifact_mb = 1024", "max_artifact_mb = 1"
        )
    )
    monkeypatch.setenv("EDGEFED_PROFILE_PATH", str(profiles))
    big = make_artifact(tmp_path / "big", keys[0], profile="tiny-box")
    (big / "padding.bin").write_bytes(b"\0" * (1024 * 1024 + 1))
    doc = json.loads((big / "manifest.json").read_text())
    (big / "manifest.json").unlink()
    (big / "signature").unlink()
    from edge_agent.protocol.artifact import seal
    from edge_agent.protocol.signing import load_private_key

    seal(big, {k: v for k, v in doc.items() if k not in ("files", "chunk_size", "schema")}, load_private_key(keys[0]),
         chunk_size=1024)  # fmt: skip
    client = admin(hub)
    client.add_artifact(big)
    hub.registry.upsert_device("box-1", profile="tiny-box")
    with pytest.raises(HubError, match=r"409.*over tiny-box's 1 MiB limit"):
        client.deploy("gemm", "1.0.0", "device:box-1")


def test_models_add_compiles_through_the_compiler_api(
    hub: Hub, tmp_path: Path, keys: tuple[Path, Path], digits_artifact: dict
) -> None:
    import numpy as np
    from conftest import ROOT

    from cloud_hub.cli import app as hub_cli

    np.savez(tmp_path / "calib.npz", x=digits_artifact["x"][:128])
    np.savez(tmp_path / "val.npz", x=digits_artifact["x"], y=digits_artifact["y"])
    client = admin(hub)
    result = CliRunner().invoke(hub_cli, [
        "models", "add", f"{ROOT / 'examples/quickstart/digits.py'}:trained", "--profile", "x86-64-generic",
        "--calib", str(tmp_path / "calib.npz"), "--val", str(tmp_path / "val.npz"), "--name", "digits",
        "--version", "2.0.0", "--key", str(keys[0]), "--hub", client.url, "--token", client.token, "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [(m["name"], m["version"], m["profile"]) for m in client.request("GET", "/v1/models")] == [
        ("digits", "2.0.0", "x86-64-generic")
    ]


def test_refused_registrations_leave_nothing_and_models_show_names_the_interface(
    hub: Hub, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    from test_interface_contract import resealed

    from cloud_hub.cli import app as hub_cli
    from cloud_hub.errors import Conflict

    client = admin(hub)
    client.add_artifact(make_artifact(tmp_path / "1.0.0", keys[0], release=1))
    renamed = [{"name": "logits", "dtype": "float32", "shape": ["batch", 30]}]
    minor = resealed(make_artifact(tmp_path / "1.1.0", keys[0], version="1.1.0", release=2), keys[0], outputs=renamed)
    stored = sorted(p.name for p in (hub.config.state_dir / "artifacts").iterdir())
    with pytest.raises(Conflict, match=r"409 .*output 'output' removed; output 'logits' added"):
        client.add_artifact(minor)
    assert sorted(p.name for p in (hub.config.state_dir / "artifacts").iterdir()) == stored  # nothing kept
    assert client.add_artifact(minor, allow_interface_change=True)["new"]
    result = CliRunner().invoke(hub_cli, ["models", "show", "gemm@1.1.0", "--hub", client.url, "--token",
                                          client.token])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert re.search(r"output\W+logits\W+float32\W+\['batch', 30\]", result.output), result.output
    assert "gemm@1.1.0: release 2, max batch no limit" in result.output
    assert re.search(r"x86-64-generic\W+onnxruntime\W+fp32.*serves", result.output), result.output
