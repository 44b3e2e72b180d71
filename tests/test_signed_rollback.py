"""Rollback as a signed decision (issue 13): the hub signs each device's desired state with a counter that
only grows, so an operator's rollback to an older version is accepted while a replayed older desired state,
or an old artifact offered without the signed decision, is refused with the installed state byte-identical;
and the agent reports every change of active version at once, a local `edge-agent rollback` included.

Real parts throughout: Mosquitto, the hub, the agent daemon, and `edge-agent rollback` in another process."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import make_artifact, tree_digest, wait_for
from test_hub_restarts import RunningAgent, admin, known
from typer.testing import CliRunner

from cloud_hub.cli import app as hub_cli
from cloud_hub.desired_signing import HUB_KEY_DIR
from cloud_hub.server import Hub, HubConfig, operator_token
from edge_agent.desired_guard import GUARD_FILE, HUB_KEYS_DIR, install_hub_key
from edge_agent.mqtt import MqttConnection
from edge_agent.protocol.desired_signing import sign_desired
from edge_agent.protocol.manifest import now_text
from edge_agent.protocol.messages import DesiredModel, DesiredState, from_wire, to_wire
from edge_agent.protocol.signing import generate_keypair, load_private_key
from edge_agent.protocol.topics import Topics
from edge_agent.store import ModelStore

TOPICS = Topics()


def start_agent(state: Path, hub: Hub, keys: tuple[Path, Path], hub_key: bool = True) -> RunningAgent:
    """The agent daemon as dev-1; with ``hub_key``, holding the hub's desired-state key (as enrolled)."""
    if hub_key and not (state / HUB_KEYS_DIR).exists():
        state.mkdir(parents=True, exist_ok=True)
        install_hub_key(state, (hub.config.state_dir / HUB_KEY_DIR / "hub.pub").read_bytes())
    agent = RunningAgent(state, hub.broker_url, keys)
    wait_for("the hub to know the device", lambda: known(hub))
    return agent


def reported(hub: Hub) -> dict[str, Any]:
    found: dict[str, Any] = admin(hub).request("GET", "/v1/devices/dev-1")["reported"] or {}
    return found


def active_version(hub: Hub, name: str = "gemm") -> str | None:
    model = next((m for m in reported(hub).get("models", []) if m["name"] == name), None)
    return model["version"] if model and model["state"] == "active" else None


def deployment(hub: Hub, deployment_id: str) -> dict[str, Any]:
    found: dict[str, Any] = admin(hub).request("GET", f"/v1/deployments/{deployment_id}")
    return found


def state_in(hub: Hub, deployment_id: str) -> str:
    return str(deployment(hub, deployment_id)["states"]["dev-1"]["state"])


def deploy_and_wait(hub: Hub, version: str) -> str:
    deployment_id = str(admin(hub).deploy("gemm", version, "device:dev-1")["deployment_id"])
    wait_for(f"{version} active", lambda: deployment(hub, deployment_id)["states"]["dev-1"]["state"] == "active")
    return deployment_id


def add_versions(hub: Hub, tmp_path: Path, keys: tuple[Path, Path], count: int) -> None:
    for release in range(1, count + 1):
        version = f"{release}.0.0"
        admin(hub).add_artifact(make_artifact(tmp_path / version, keys[0], version=version, release=release,
                                              seed=release))  # fmt: skip


class Retained:
    """The retained desired state of dev-1, as the broker holds it (the raw signed bytes)."""

    def __init__(self, hub: Hub) -> None:
        self.payloads: list[bytes] = []
        self.mqtt = MqttConnection(hub.broker_url)
        self.mqtt.route(TOPICS.desired("dev-1"), lambda topic, payload: self.payloads.append(payload))
        self.mqtt.start()

    def latest(self, counter_above: int = 0) -> bytes:
        def newer() -> bytes | None:
            found = [p for p in self.payloads if p and from_wire(DesiredState, p).counter > counter_above]
            return found[-1] if found else None

        payload: bytes = wait_for("a signed desired state", newer, 10)
        return payload

    def publish(self, payload: bytes) -> None:
        self.mqtt.publish(TOPICS.desired("dev-1"), payload, retain=True).wait_for_publish(5)

    def stop(self) -> None:
        self.mqtt.stop()


def refused_with(hub: Hub, text: str) -> bool:
    return text in (reported(hub).get("error") or "")


@pytest.fixture
def device_state(tmp_path: Path) -> Path:
    return tmp_path / "device"


def test_an_operator_rollback_is_accepted_and_a_plain_downgrade_is_not(
    hub: Hub, tmp_path: Path, keys: tuple[Path, Path], device_state: Path
) -> None:
    add_versions(hub, tmp_path, keys, 3)
    agent = start_agent(device_state, hub, keys)
    try:
        deploy_and_wait(hub, "2.0.0")
        deploy_and_wait(hub, "3.0.0")
        models = device_state / "models"
        before = tree_digest(models)
        plain = admin(hub).deploy("gemm", "2.0.0", "device:dev-1")["deployment_id"]  # no signed decision
        wait_for("the plain downgrade refused", lambda: deployment(hub, plain)["states"]["dev-1"]["state"] == "failed")
        assert "downgrade" in deployment(hub, plain)["states"]["dev-1"]["error"]
        assert tree_digest(models) == before and active_version(hub) is None  # reported failed, 3.0.0 serving
        assert ModelStore(models).active("gemm").version == "3.0.0"  # type: ignore[union-attr]

        # 1.0.0 was never on the device: fetched and installed below the installed releases
        result = CliRunner().invoke(hub_cli, ["rollback", "gemm", "--to", "1.0.0", "--to-target", "device:dev-1",
                                              "--hub", f"http://127.0.0.1:{hub.admin.port}",  # type: ignore[union-attr]
                                              "--token", operator_token(hub.config.state_dir), "--json"])  # fmt: skip
        assert result.exit_code == 0, result.output
        rollback_id = json.loads(result.stdout)[0]["deployment"]
        wait_for("1.0.0 active", lambda: deployment(hub, rollback_id)["states"]["dev-1"]["state"] == "active")
        assert deployment(hub, rollback_id)["rollback"] is True and active_version(hub) == "1.0.0"

        # 2.0.0 is installed: verified and activated in place, through Hub.rollback (the rollout engine's call)
        again = hub.rollback("gemm", "2.0.0", "device:dev-1")
        assert again["rollback"] is True and set(again["devices"]) == {"dev-1"}
        wait_for("2.0.0 active", lambda: state_in(hub, again["deployment_id"]) == "active")
        assert reported(hub)["error"] is None
        audit = hub.registry.db.execute("SELECT detail FROM audit WHERE action = 'rollback'").fetchall()
        assert len(audit) == 2

        # a rollback authorises that decision only: after 3.0.0 again, a plain deploy of 2.0.0 is a downgrade
        deploy_and_wait(hub, "3.0.0")
        later = admin(hub).deploy("gemm", "2.0.0", "device:dev-1")["deployment_id"]
        wait_for("the later downgrade refused", lambda: state_in(hub, later) == "failed")
        assert "downgrade" in deployment(hub, later)["states"]["dev-1"]["error"]
        assert ModelStore(models).active("gemm").version == "3.0.0"  # type: ignore[union-attr]
    finally:
        agent.stop()


def test_replayed_unsigned_and_forged_desired_states_are_refused_leaving_the_store_byte_identical(
    hub: Hub, tmp_path: Path, keys: tuple[Path, Path], device_state: Path
) -> None:
    add_versions(hub, tmp_path, keys, 2)
    agent = start_agent(device_state, hub, keys)
    retained = Retained(hub)
    try:
        deploy_and_wait(hub, "1.0.0")
        old = retained.latest()  # the signed desired state for 1.0.0, captured
        hub.rollback("gemm", "1.0.0", "device:dev-1")  # a signed rollback statement for 1.0.0, captured too
        old_rollback = retained.latest(from_wire(DesiredState, old).counter)
        deploy_and_wait(hub, "2.0.0")
        genuine = retained.latest(from_wire(DesiredState, old_rollback).counter)  # the hub's current one
        current = from_wire(DesiredState, genuine)
        models = device_state / "models"
        before = tree_digest(models)

        def refused(payload: bytes, why: str) -> None:
            retained.publish(payload)
            wait_for(f"refusal: {why}", lambda: refused_with(hub, why), 10)
            assert tree_digest(models) == before, why
            assert ModelStore(models).active("gemm").version == "2.0.0", why  # type: ignore[union-attr]
            retained.publish(genuine)  # the hub's own again: the same decision, accepted; the error clears
            wait_for("the error cleared", lambda: reported(hub).get("error") is None, 10)

        refused(old, f"counter {from_wire(DesiredState, old).counter} is not above {current.counter}")
        refused(old_rollback, "is not above")  # a replayed signed rollback: still a replay
        unsigned = DesiredState("forged", now_text(), (dataclasses.replace(current.models[0], version="1.0.0"),))
        refused(to_wire(dataclasses.replace(unsigned, device_id="dev-1", counter=current.counter + 10)), "unsigned")
        # the artifact of 1.0.0, marked as a rollback, signed by a key that is not the hub's
        artifact = hub.registry.artifacts("gemm", "1.0.0")[0]
        row = hub.registry.artifact(artifact["artifact_id"])
        offer = DesiredModel("gemm", "1.0.0", artifact["artifact_id"], row["manifest"], row["signature"], rollback=True)
        forged = DesiredState("forged", now_text(), (offer,), "dev-1", current.counter + 10)
        attacker = load_private_key(generate_keypair(tmp_path / "attacker")[0])
        refused(sign_desired(forged, attacker), "does not verify")
        # the hub's own signature, over another device's state: not for this one
        other = hub.desired_signer.payload("dev-2", DesiredState("x", now_text(), (offer,)))
        refused(other, "signed for device 'dev-2'")
        # a signed body altered after signing (the rollback flag switched on)
        body = json.loads(genuine)
        body["models"][0]["rollback"] = True
        refused(json.dumps(body).encode(), "does not verify")
    finally:
        retained.stop()
        agent.stop()


def test_the_counter_survives_agent_and_hub_restarts(
    mosquitto: Any, tmp_path: Path, keys: tuple[Path, Path], device_state: Path
) -> None:
    def start_hub() -> Hub:
        running = Hub(HubConfig(tmp_path / "hub", broker=mosquitto.url, grpc_port=0, admin_port=0))
        running.start()
        return running

    (tmp_path / "hub" / "trust").mkdir(parents=True)
    (tmp_path / "hub" / "trust" / keys[1].name).write_bytes(keys[1].read_bytes())
    hub = start_hub()
    add_versions(hub, tmp_path, keys, 2)
    agent = start_agent(device_state, hub, keys)
    retained = Retained(hub)
    try:
        deploy_and_wait(hub, "1.0.0")
        first = retained.latest()
        counter = from_wire(DesiredState, first).counter
        assert json.loads((device_state / GUARD_FILE).read_text())["counter"] == counter
        agent.stop()
        agent = start_agent(device_state, hub, keys)  # the retained copy again: the same decision, accepted
        seen = len(retained.payloads)
        hub.stop()
        hub = start_hub()  # republishes every desired state: the very same signed message
        wait_for("the hub to publish it again", lambda: len(retained.payloads) > seen, 10)
        assert retained.payloads[-1] == first and reported(hub)["error"] is None
        deploy_and_wait(hub, "2.0.0")
        second = from_wire(DesiredState, retained.latest(counter))
        assert second.counter > counter
        agent.stop()
        agent = start_agent(device_state, hub, keys)
        wait_for("the agent back", lambda: reported(hub)["desired_counter"] == second.counter)
        before = tree_digest(device_state / "models")
        retained.publish(first)  # replayed after both restarts
        wait_for("the replay refused", lambda: refused_with(hub, f"counter {counter} is not above {second.counter}"))
        assert tree_digest(device_state / "models") == before
    finally:
        retained.stop()
        agent.stop()
        hub.stop()


def edge_agent(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`edge-agent` in another process, as an operator on the device would run it."""
    command = [sys.executable, "-m", "edge_agent.cli", *args, "--state-dir", str(state)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_a_local_rollback_reaches_the_hub_at_once_and_twice_goes_further_back(
    hub: Hub, tmp_path: Path, keys: tuple[Path, Path], device_state: Path
) -> None:
    add_versions(hub, tmp_path, keys, 3)
    agent = start_agent(device_state, hub, keys)
    try:
        for version in ("1.0.0", "2.0.0"):
            deploy_and_wait(hub, version)
        latest = deploy_and_wait(hub, "3.0.0")
        lags = []
        for expected in ("2.0.0", "1.0.0"):  # twice: further back, never forward again
            done = edge_agent(device_state, "rollback", "gemm")
            began = time.monotonic()
            assert done.returncode == 0, done.stderr
            assert f"active {expected}" in done.stderr
            wait_for(f"the hub to see {expected}", lambda v=expected: active_version(hub) == v, 5)  # type: ignore[misc]
            lags.append(time.monotonic() - began)
        assert max(lags) <= 2.0, lags
        third = edge_agent(device_state, "rollback", "gemm")
        assert third.returncode == 2 and "oldest installed version" in third.stderr
        model = next(m for m in reported(hub)["models"] if m["name"] == "gemm")
        assert model["origin"] == "local"
        assert deployment(hub, latest)["states"]["dev-1"]["state"] == "overridden"
        # the same desired state delivered again (an agent restart) leaves the local rollback standing
        agent.stop()
        agent = start_agent(device_state, hub, keys)
        time.sleep(3.0)
        assert active_version(hub) == "1.0.0"
        # the hub's next decision replaces it
        deploy_and_wait(hub, "3.0.0")
        assert ModelStore(device_state / "models").active("gemm").version == "3.0.0"  # type: ignore[union-attr]
    finally:
        agent.stop()


def test_an_agent_without_a_hub_key_follows_unsigned_desired_states_but_no_rollback(
    hub: Hub, tmp_path: Path, keys: tuple[Path, Path], device_state: Path
) -> None:
    add_versions(hub, tmp_path, keys, 2)
    agent = start_agent(device_state, hub, keys, hub_key=False)
    old_hub = MqttConnection(hub.broker_url)  # a hub older than signed desired states
    old_hub.start()
    try:
        deploy_and_wait(hub, "1.0.0")  # the hub signs; an agent with no hub key follows it as before
        artifact = hub.registry.artifacts("gemm", "2.0.0")[0]
        row = hub.registry.artifact(artifact["artifact_id"])
        offer = DesiredModel("gemm", "2.0.0", artifact["artifact_id"], row["manifest"], row["signature"])
        unsigned = {k: v for k, v in json.loads(to_wire(DesiredState("old", now_text(), (offer,)))).items()
                    if k not in ("device_id", "counter", "signature")}  # fmt: skip
        unsigned["models"][0].pop("rollback")  # exactly what an older hub sends
        old_hub.publish(TOPICS.desired("dev-1"), json.dumps(unsigned).encode(), retain=True).wait_for_publish(5)
        wait_for("2.0.0 active", lambda: active_version(hub) == "2.0.0")
        before = tree_digest(device_state / "models")
        rollback = hub.rollback("gemm", "1.0.0", "device:dev-1")  # signed, but this device cannot verify it
        wait_for("the rollback refused", lambda: deployment(hub, rollback["deployment_id"])["states"]["dev-1"]["state"]
                 == "failed")  # fmt: skip
        assert "downgrade" in deployment(hub, rollback["deployment_id"])["states"]["dev-1"]["error"]
        assert tree_digest(device_state / "models") == before
    finally:
        old_hub.stop()
        agent.stop()


def test_the_store_goes_below_the_installed_release_only_when_told(
    tmp_path: Path, keys: tuple[Path, Path], device: tuple[Path, ModelStore, Any]
) -> None:
    from device_profiles import get_profile
    from edge_agent.protocol.errors import ArtifactRejected

    state, store, trust = device
    profile = get_profile("x86-64-generic")
    store.install(make_artifact(tmp_path / "2", keys[0], version="2.0.0", release=2), trust, profile, activate=True)
    old = make_artifact(tmp_path / "1", keys[0], version="1.0.0", release=1, seed=1)
    before = tree_digest(state / "models")
    with pytest.raises(ArtifactRejected, match="downgrade"):
        store.install(old, trust, profile, activate=True)
    assert tree_digest(state / "models") == before
    store.install(old, trust, profile, activate=True, allow_release_below=True)
    assert store.active("gemm").version == "1.0.0"  # type: ignore[union-attr]


def test_enrollment_gives_the_device_the_hub_key_apart_from_the_artifact_keys(hub: Hub, tmp_path: Path) -> None:
    from edge_agent.enroll import enroll

    token = hub.enroll_token([], {}, 60)["token"]
    state = tmp_path / "enrolled"
    enroll(f"http://127.0.0.1:{hub.admin.port}", token, "dev-9", "x86-64-generic", state)  # type: ignore[union-attr]
    hub_pub = (hub.config.state_dir / HUB_KEY_DIR / "hub.pub").read_bytes()
    assert (state / HUB_KEYS_DIR / "hub.pub").read_bytes() == hub_pub
    from edge_agent.protocol.signing import key_id, public_key_from_pem
    from edge_agent.trust import artifact_trust

    trusted = artifact_trust(state).keys  # from the signed key set: the hub key is never an artifact key
    assert trusted and key_id(public_key_from_pem(hub_pub)) not in trusted
    assert (hub.config.state_dir / HUB_KEY_DIR / "hub.key").stat().st_mode & 0o777 == 0o600


def test_a_repeated_decision_keeps_its_signed_message_and_a_new_one_gets_a_higher_counter(hub: Hub) -> None:
    signer = hub.desired_signer
    state = DesiredState("d1", now_text(), ())
    first = signer.payload("dev-5", state)
    time.sleep(0.01)
    assert signer.payload("dev-5", dataclasses.replace(state, issued_at=now_text())) == first  # republished
    second = signer.payload("dev-5", DesiredState("d2", now_text(), ()))  # a new deployment, same models
    assert from_wire(DesiredState, second).counter > from_wire(DesiredState, first).counter
    assert signer.payload("dev-5", state) == second  # an older deployment named again: no older message
    threads = [threading.Thread(target=signer.payload, args=("dev-5", DesiredState(f"t{i}", now_text(), ())))
               for i in range(4)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert signer.counter("dev-5") > from_wire(DesiredState, second).counter


def test_init_takes_the_hub_key_and_refuses_a_file_that_is_not_one(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    from edge_agent.cli import app as agent_cli

    hub_pub = generate_keypair(tmp_path / "hub-key", "hub")[1]
    args = ["init", "--device-id", "dev-1", "--trust", str(keys[1]), "--profile", "x86-64-generic"]
    done = CliRunner().invoke(agent_cli, [*args, "--hub-key", str(hub_pub), "--state-dir", str(tmp_path / "a")])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "a" / HUB_KEYS_DIR / "hub.pub").read_bytes() == hub_pub.read_bytes()
    bad = CliRunner().invoke(agent_cli, [*args, "--hub-key", str(keys[0]), "--state-dir", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "not an Ed25519 public key" in bad.output
    assert not (tmp_path / "b" / HUB_KEYS_DIR / "hub.pub").exists()


def test_a_local_rollback_just_before_a_report_is_reported_as_local_not_absorbed(
    tmp_path: Path, keys: tuple[Path, Path], device: tuple[Path, ModelStore, Any]
) -> None:
    """A report made for another reason (a reconnection, another model's install) before the next 1-second
    look still reports a local rollback made in between as one, and records it as an override."""
    from device_profiles import get_profile
    from edge_agent.agent import Agent
    from edge_agent.config import AgentConfig
    from edge_agent.desired_guard import read_overrides
    from edge_agent.protocol.messages import ReportedState

    state, store, trust = device
    profile = get_profile("x86-64-generic")
    for release in (1, 2):
        artifact = make_artifact(tmp_path / str(release), keys[0], version=f"{release}.0.0", release=release,
                                 seed=release)  # fmt: skip
        store.install(artifact, trust, profile, activate=True)
    agent = Agent(state, AgentConfig.load(state))
    published: list[bytes] = []
    agent.mqtt.publish = lambda topic, payload, retain=False: published.append(payload)  # type: ignore[assignment,misc]
    done = edge_agent(state, "rollback", "gemm")  # another process, between two looks of the daemon
    assert done.returncode == 0, done.stderr
    agent._publish_reported()  # as on a reconnection, before the next look
    gemm = next(m for m in from_wire(ReportedState, published[-1]).models if m.name == "gemm")
    assert (gemm.version, gemm.origin) == ("1.0.0", "local")
    assert read_overrides(state)["gemm"]["version"] == "1.0.0"
    # the daemon's own switch is not taken for a local one
    two = next(m for m in store.versions("gemm") if m.version == "2.0.0")
    assert agent._activate_installed("gemm", "2.0.0", two.artifact_id)
    count = len(published)
    agent._watch_active()
    assert len(published) == count


def test_a_crash_after_accepting_a_new_decision_leaves_no_stale_local_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent dies right after the guard stored the new counter: on restart the retained copy is the same
    decision (a repeat), so an override of the previous one still on disk would keep the device off it."""
    import edge_agent.desired_guard as guard_module
    from edge_agent.desired_guard import DesiredGuard, models_to_follow, read_overrides, record_override
    from edge_agent.store import ActiveRecord

    state = tmp_path / "device"
    hub_key, hub_pub = generate_keypair(tmp_path / "hub-key", "hub")
    install_hub_key(state, hub_pub.read_bytes())
    record_override(state, "gemm", "1.0.0", "a" * 64)  # a local rollback under the previous decision
    offer = DesiredModel("gemm", "3.0.0", "c" * 64, {}, {})
    payload = sign_desired(DesiredState("d-3", now_text(), (offer,), "dev-1", 5), load_private_key(hub_key))

    class Crash(BaseException):
        pass

    from edge_agent.protocol.atomic import atomic_write_bytes as write

    def crash_after_the_guard(path: Path, data: bytes) -> None:
        write(path, data)
        if path.name == GUARD_FILE:
            raise Crash

    monkeypatch.setattr(guard_module, "atomic_write_bytes", crash_after_the_guard)
    with pytest.raises(Crash):
        DesiredGuard(state, "dev-1").accept(payload)
    monkeypatch.setattr(guard_module, "atomic_write_bytes", write)
    accepted = DesiredGuard(state, "dev-1").accept(payload)  # the retained copy, after the restart
    assert accepted.repeat
    assert "gemm" not in read_overrides(state)
    follow, kept = models_to_follow(accepted, state, lambda name: ActiveRecord("1.0.0", "a" * 64, 1, None))
    assert [m.name for m in follow] == ["gemm"] and not kept


def test_a_bad_hub_key_leaves_the_installed_one(tmp_path: Path) -> None:
    state = tmp_path / "device"
    pem = generate_keypair(tmp_path / "hub-key", "hub")[1].read_bytes()
    path = install_hub_key(state, pem)
    for bad in (b"not a key", generate_keypair(tmp_path / "x", "x")[0].read_bytes(), b""):
        with pytest.raises(ValueError, match="not an Ed25519 public key"):
            install_hub_key(state, bad)
        assert path.read_bytes() == pem
    assert sorted(p.name for p in (state / HUB_KEYS_DIR).iterdir()) == ["hub.pub"]
