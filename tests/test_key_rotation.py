"""Signing keys that can change (issue 14): the signed key set, hub-key rotation and key revocation, with a
real hub, real enrolled agents and a real broker (Mosquitto).

- a rotation (and a new artifact key) reaches an enrolled device, and a model signed with the new key,
  deployed in a desired state signed with the new hub key, then installs;
- an artifact signed by a revoked key is refused on the device (deploy path and `edge-agent install`)
  and by `cloud-hub models add`;
- a key set signed by an unknown key, altered, or older than the device's is refused and changes
  nothing on disk;
- a rotation survives an agent restart and a hub restart; an interrupted rotation is finished or undone.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_artifact, tree_digest, wait_for
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from cloud_hub.cli import app as hub_cli
from cloud_hub.desired_signing import HUB_KEY_DIR
from cloud_hub.keyset_files import KeySetFiles
from cloud_hub.server import Hub, HubConfig
from edge_agent.agent import Agent
from edge_agent.cli import app as agent_cli
from edge_agent.config import AgentConfig
from edge_agent.enroll import enroll
from edge_agent.mqtt import MqttConnection
from edge_agent.protocol.errors import KeySetRefused
from edge_agent.protocol.keyset import build, sign, to_message
from edge_agent.protocol.signing import generate_keypair, key_id, load_private_key, load_public_key
from edge_agent.protocol.topics import Topics
from edge_agent.trust import KEYSET_FILE, artifact_trust, held_keyset, take_keyset

PROFILE = "x86-64-generic"
TOPICS = Topics()


def url(hub: Hub) -> str:
    assert hub.admin is not None
    return f"http://127.0.0.1:{hub.admin.port}"


def hub_cmd(hub: Hub, *args: str) -> Any:
    """A `cloud-hub` command against ``hub`` (CliRunner: the real Typer app, the real admin API)."""
    return CliRunner().invoke(hub_cli, [*args, "--hub", url(hub), "--state-dir", str(hub.config.state_dir)])


def hub_json(hub: Hub, *args: str) -> Any:
    result = hub_cmd(hub, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


class RunningAgent:
    """The agent daemon of an enrolled device, in a thread."""

    def __init__(self, state: Path) -> None:
        self.agent = Agent(state, AgentConfig.load(state))
        self.thread = threading.Thread(target=self.agent.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.agent.stop_event.set()
        self.thread.join(timeout=10)


def enroll_device(hub: Hub, state: Path, device_id: str = "dev-1") -> None:
    token = hub_cmd(hub, "devices", "enroll-token")
    assert token.exit_code == 0, token.output
    enroll(url(hub), token.stdout.strip(), device_id, PROFILE, state)


def reported_model(hub: Hub, name: str = "gemm", device_id: str = "dev-1") -> dict[str, Any]:
    reported = hub.registry.device(device_id)["reported"] or {}
    return next((m for m in reported.get("models", []) if m["name"] == name), {})


def deploy_and_wait(hub: Hub, version: str, state: str = "active") -> dict[str, Any]:
    result = hub_cmd(hub, "deploy", f"gemm@{version}", "--to", "device:dev-1")
    assert result.exit_code == 0, result.output
    found: dict[str, Any] = wait_for(f"gemm@{version} {state}", lambda: (m := reported_model(hub)).get("version")
                                     == version and m.get("state") == state and m)  # fmt: skip
    return found


def device_version(state: Path) -> int:
    held = held_keyset(state)
    return held.version if held is not None else 0


@pytest.fixture
def new_key(tmp_path: Path) -> tuple[Path, Path]:
    """A second artifact-signing key pair, as `model-compiler keygen` writes it."""
    return generate_keypair(tmp_path / "new-key")


@pytest.fixture
def device(hub: Hub, tmp_path: Path) -> Iterator[tuple[Path, RunningAgent]]:
    state = tmp_path / "device"
    enroll_device(hub, state)
    agent = RunningAgent(state)
    wait_for("the device's report", lambda: hub.registry.device("dev-1")["reported"])
    yield state, agent
    agent.stop()


def test_enrollment_installs_trust_from_the_signed_key_set(hub: Hub, device: tuple[Path, RunningAgent],
                                                          keys: tuple[Path, Path]) -> None:  # fmt: skip
    state, _ = device
    listed = hub_json(hub, "keys", "list")
    held = held_keyset(state)
    assert held is not None and held.version == listed["version"]
    assert set(held.roots) == {k["key_id"] for k in listed["hub_keys"]} == {key_id(hub.keys.key.public_key())}
    assert set(artifact_trust(state).keys) == {key_id(load_public_key(keys[1]))}
    assert not (state / "trust").exists()  # the hub's keys came only through the key set
    assert hub.registry.device("dev-1")["reported"]["keyset_version"] == listed["version"]


def test_a_rotation_reaches_the_device_and_a_model_signed_with_a_new_key_installs(
    hub: Hub, device: tuple[Path, RunningAgent], new_key: tuple[Path, Path], tmp_path: Path
) -> None:
    state, _ = device
    old_hub_key = key_id(hub.keys.key.public_key())
    added = hub_json(hub, "keys", "add", str(new_key[1]))
    assert added["added"] and added["key_id"] == key_id(load_public_key(new_key[1]))
    rotated = hub_json(hub, "keys", "rotate")
    assert rotated["retired_key_id"] == old_hub_key and rotated["key_id"] != old_hub_key
    assert rotated["version"] == added["version"] + 1
    key_file = hub.config.state_dir / HUB_KEY_DIR / "hub.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_id(load_private_key(key_file).public_key()) == rotated["key_id"]
    assert not list((hub.config.state_dir / HUB_KEY_DIR).glob("hub-next*"))

    wait_for("the new key set on the device", lambda: device_version(state) == rotated["version"])
    held = held_keyset(state)
    assert held is not None and set(held.roots) == {rotated["key_id"]} and old_hub_key in held.revoked
    assert added["key_id"] in artifact_trust(state).keys

    upload = hub_cmd(hub, "models", "add", str(make_artifact(tmp_path / "v2", new_key[0], version="2.0.0",
                                                             release=2, seed=2)))  # fmt: skip
    assert upload.exit_code == 0, upload.output
    deploy_and_wait(hub, "2.0.0")  # desired state signed by the new hub key, artifact by the new artifact key
    token = hub_cmd(hub, "devices", "enroll-token").stdout.strip()
    assert token.endswith(rotated["fingerprint"])  # new tokens pin the new hub key


def test_an_artifact_signed_by_a_revoked_key_is_refused_everywhere(
    hub: Hub, device: tuple[Path, RunningAgent], new_key: tuple[Path, Path], tmp_path: Path
) -> None:
    state, agent = device
    kid = hub_json(hub, "keys", "add", str(new_key[1]))["key_id"]
    for version, release in (("1.0.0", 1), ("2.0.0", 2)):  # stored while the key is trusted
        upload = hub_cmd(hub, "models", "add", str(make_artifact(tmp_path / version, new_key[0], version=version,
                                                                 release=release, seed=release)))  # fmt: skip
        assert upload.exit_code == 0, upload.output
    deploy_and_wait(hub, "1.0.0")

    revoked = hub_json(hub, "keys", "revoke", kid)
    assert revoked["revoked"] and kid in hub_json(hub, "keys", "list")["revoked"]
    wait_for("the revocation on the device", lambda: device_version(state) == revoked["version"])
    assert kid not in artifact_trust(state).keys and kid in artifact_trust(state).revoked

    models_before = tree_digest(state / "models")
    failed = deploy_and_wait(hub, "2.0.0", state="failed")  # the agent's deploy path
    assert "revoked key" in failed["error"] and kid in failed["error"]
    assert tree_digest(state / "models") == models_before

    upload = hub_cmd(hub, "models", "add", str(make_artifact(tmp_path / "3.0.0", new_key[0], version="3.0.0",
                                                             release=3, seed=3)))  # fmt: skip
    assert upload.exit_code != 0 and "revoked key" in upload.output, upload.output
    assert not any(a["version"] == "3.0.0" for a in hub.registry.artifacts("gemm"))

    agent.stop()
    before = tree_digest(state / "models")
    installed = CliRunner().invoke(agent_cli, ["install", str(tmp_path / "3.0.0"), "--state-dir", str(state)])
    assert installed.exit_code == 2 and "revoked key" in installed.output, installed.output
    assert tree_digest(state / "models") == before
    again = hub_cmd(hub, "keys", "add", str(new_key[1]))
    assert again.exit_code != 0 and "never trusted again" in again.output
    table = hub_cmd(hub, "keys", "list")
    assert table.exit_code == 0 and kid in table.stdout and "revoked" in table.stdout
    audit = hub_json(hub, "audit")
    revokes = [e for e in audit if e["action"] == "POST /v1/keys/{key_id}/revoke"]
    assert [(e["actor"], e["detail"]["targets"]["key_id"], e["detail"]["outcome"]) for e in revokes] == [
        ("bootstrap", kid, "ok")]  # fmt: skip


def refused(caplog: pytest.LogCaptureFixture, expected: str) -> Any:
    return lambda: any(expected in r.getMessage() for r in caplog.records)


def foreign_message(version: int, keys: tuple[Path, Path]) -> bytes:
    """A key set naming an unknown hub key (and trusting a key of its own), signed by it."""
    stranger = Ed25519PrivateKey.generate()
    signed = build(version, "now", [stranger.public_key()], [load_public_key(keys[1])], [])
    return to_message([sign(signed, [stranger])])


def test_forged_altered_and_replayed_key_sets_are_refused_and_change_nothing(
    hub: Hub, device: tuple[Path, RunningAgent], new_key: tuple[Path, Path], keys: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    state, _ = device
    old_message = hub.keys.message()  # the version the device holds now
    added = hub_json(hub, "keys", "add", str(new_key[1]))
    wait_for("the new key set on the device", lambda: device_version(state) == added["version"])
    current = hub.keys.keyset
    altered_signed = json.loads(json.dumps(current.envelope))
    altered_signed["signed"]["version"] += 10  # a higher version under the hub's real signature
    intruder = Ed25519PrivateKey.generate()
    rotated_alone = sign(build(current.version + 1, "now", [intruder.public_key()], current.keys.values(),
                               current.revoked), [intruder])  # fmt: skip
    forgeries = {
        "does not verify (altered)": to_message([altered_signed]),
        "not signed by a hub key of the key set this device holds": foreign_message(current.version + 5, keys),
        "is not signed by a hub key": to_message([rotated_alone]),
        "not above": old_message,  # replayed: the older key set, genuinely signed
    }
    trusted = tree_digest(state / "models"), (state / KEYSET_FILE).read_bytes()
    publisher = MqttConnection(hub.broker_url)
    publisher.start()
    try:
        with caplog.at_level(logging.ERROR, logger="edge_agent.agent"):
            for expected, payload in forgeries.items():
                caplog.clear()
                publisher.publish(TOPICS.keyset("dev-1"), payload, retain=True).wait_for_publish(5)
                wait_for(f"the agent to refuse ({expected})", refused(caplog, expected), 10)
                assert (tree_digest(state / "models"), (state / KEYSET_FILE).read_bytes()) == trusted
    finally:
        publisher.stop()
    for expected, payload in forgeries.items():  # the same rules without the broker, and the same nothing changed
        with pytest.raises(KeySetRefused, match=re.escape(expected)):
            take_keyset(state, payload)
        assert (state / KEYSET_FILE).read_bytes() == trusted[1]
    assert take_keyset(state, hub.keys.message()) is None  # the genuine one again: a repeat, nothing to take


def test_a_device_enrolled_before_key_sets_takes_the_first_one_with_its_hub_key(hub: Hub, tmp_path: Path) -> None:
    state = tmp_path / "old-device"
    (state / "hub-keys").mkdir(parents=True)
    shutil.copy(hub.config.state_dir / HUB_KEY_DIR / "hub.pub", state / "hub-keys" / "hub.pub")
    taken = take_keyset(state, hub.keys.message())
    held = held_keyset(state)
    assert taken is not None and held is not None and held.version == taken.version == hub.keys.keyset.version
    assert set(held.roots) == {key_id(hub.keys.key.public_key())}
    bare = tmp_path / "no-hub-key"
    bare.mkdir()
    with pytest.raises(KeySetRefused, match="holds no hub key"):
        take_keyset(bare, hub.keys.message())
    assert not (bare / KEYSET_FILE).exists()


def test_a_rotation_survives_agent_and_hub_restarts(mosquitto: Any, tmp_path: Path, keys: tuple[Path, Path]) -> None:
    hub_state = tmp_path / "hub"
    (hub_state / "trust").mkdir(parents=True)
    shutil.copy(keys[1], hub_state / "trust")
    config = HubConfig(hub_state, broker=mosquitto.url, grpc_port=0, admin_port=0)
    hub = Hub(config)
    hub.start()
    state = tmp_path / "device"
    agent: RunningAgent | None = None
    try:
        enroll_device(hub, state)
        agent = RunningAgent(state)
        wait_for("the device's report", lambda: hub.registry.device("dev-1")["reported"])
        hub_cmd(hub, "models", "add", str(make_artifact(tmp_path / "v1", keys[0])))
        deploy_and_wait(hub, "1.0.0")
        rotated = hub_json(hub, "keys", "rotate")
        wait_for("the rotation on the device", lambda: device_version(state) == rotated["version"])
        agent.stop()
        hub.stop()
        hub = Hub(config)  # the same state directory: the rotated key and key set
        hub.start()
        assert key_id(hub.desired_signer.key.public_key()) == rotated["key_id"]
        assert hub_json(hub, "keys", "list")["version"] == rotated["version"]
        hub_cmd(hub, "models", "add", str(make_artifact(tmp_path / "v2", keys[0], version="2.0.0", release=2, seed=2)))
        agent = RunningAgent(state)  # restarted: it checks desired states with the key set it stored
        assert agent.agent.guard.hub_keys.keys.keys() == {rotated["key_id"]}
        deploy_and_wait(hub, "2.0.0")
    finally:
        if agent is not None:
            agent.stop()
        hub.stop()


def test_a_device_offline_during_two_rotations_walks_the_chain(
    hub: Hub, device: tuple[Path, RunningAgent], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    state, agent = device
    hub_cmd(hub, "models", "add", str(make_artifact(tmp_path / "v1", keys[0])))
    deploy_and_wait(hub, "1.0.0")
    agent.stop()
    first, second = hub_json(hub, "keys", "rotate"), hub_json(hub, "keys", "rotate")
    assert second["retired_key_id"] == first["key_id"]
    upload = hub_cmd(hub, "models", "add", str(make_artifact(tmp_path / "v2", keys[0], version="2.0.0", release=2,
                                                             seed=2)))  # fmt: skip
    assert upload.exit_code == 0, upload.output
    assert hub_cmd(hub, "deploy", "gemm@2.0.0", "--to", "device:dev-1").exit_code == 0  # signed by the third key
    assert device_version(state) == first["version"] - 1  # it missed both
    restarted = RunningAgent(state)
    try:
        wait_for("2.0.0 active", lambda: reported_model(hub).get("version") == "2.0.0"
                 and reported_model(hub).get("state") == "active")  # fmt: skip
        held = held_keyset(state)
        assert held is not None and held.version == second["version"] and set(held.roots) == {second["key_id"]}
        assert {first["retired_key_id"], first["key_id"]} <= held.revoked
        assert (hub.registry.device("dev-1")["reported"] or {}).get("error") is None
    finally:
        restarted.stop()


def test_an_interrupted_rotation_is_finished_or_undone(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    from cloud_hub.keys import HubKeys
    from cloud_hub.workers import open_store

    state = tmp_path / "hub"
    (state / "trust").mkdir(parents=True)
    shutil.copy(keys[1], state / "trust")
    registry, store = open_store(state)
    first = HubKeys(state, registry, store)
    old = key_id(first.key.public_key())
    files = KeySetFiles(state)
    files.new_hub_key()  # a crash before the commit: the new key is thrown away
    assert stat.S_IMODE((state / HUB_KEY_DIR / "hub-next.key").stat().st_mode) == 0o600
    assert key_id(HubKeys(state, registry, store).key.public_key()) == old
    assert not list((state / HUB_KEY_DIR).glob("hub-next*"))

    new = files.new_hub_key()  # a crash after the commit (the key set names the new key): finished
    current = files.current()
    assert current is not None
    signed = build(current.version + 1, "now", [new.public_key()], current.keys.values(), {*current.revoked, old})
    from edge_agent.protocol.keyset import parse

    files.save(parse(sign(signed, [load_private_key(state / HUB_KEY_DIR / "hub.key"), new])), roots_changed=True)
    resumed = HubKeys(state, registry, store)
    assert key_id(resumed.key.public_key()) == key_id(new.public_key()) != old
    assert resumed.keyset.version == current.version + 1
    assert store.trust.keys.keys() == {key_id(load_public_key(keys[1]))}
