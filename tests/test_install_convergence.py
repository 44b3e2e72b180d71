"""Installs that always converge (issues 11, 13): an agent SIGKILLed at each named install step (the
golden-sample check among them), after each number of downloaded chunks, or at a random moment, then
restarted, ends active on the new version or failed with the previous one serving, with no download left behind;
the store keeps exactly the bytes it verified; a BOM is refused at the signature step; an unreadable
version directory breaks nothing else; a corrupted copy of the installed artifact is refused."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import broken_gemm_onnx, free_port, make_artifact, tree_digest, wait_for
from typer.testing import CliRunner

from cloud_hub.server import Hub
from device_profiles import get_profile
from edge_agent.cli import app as agent_cli
from edge_agent.config import AgentConfig
from edge_agent.protocol import artifact as artifact_module
from edge_agent.protocol.artifact import MANIFEST_FILE, seal, verify_files
from edge_agent.protocol.canonical import strict_loads
from edge_agent.protocol.errors import ArtifactRejected
from edge_agent.protocol.signing import TrustStore, load_private_key
from edge_agent.store import KILL_POINT_ENV, ModelStore

PROFILE = get_profile("x86-64-generic")
BOM = b"\xef\xbb\xbf"
_SEEDED = random.Random(11)
RANDOM_DELAYS_S = [round(_SEEDED.uniform(0.0, 0.3), 3) for _ in range(12)]  # the install window, seeded
STEPS = ("downloaded", "assembled", "staging", "staged", "published", "golden", "checked", "activated", "reported")
CHUNK_POINTS = tuple(f"chunk-{n}" for n in range(1, 13))  # killed with n of v2's 13 chunks stored (byte offsets)
KILL_POINTS = STEPS + CHUNK_POINTS  # every one is a distinct place in the install where the process dies


def broken_artifact(directory: Path, key: Path, **options: Any) -> Path:
    """A signed artifact whose model loads but fails its health check."""
    make_artifact(directory, key, **options)
    fields = json.loads((directory / MANIFEST_FILE).read_bytes())
    for derived in ("files", "chunk_size", "schema"):
        fields.pop(derived)
    broken_gemm_onnx(directory / "model.onnx")
    seal(directory, fields, load_private_key(key), chunk_size=1024)
    return directory


# observation 5: a BOM -------------------------------------------------------------------------------
def test_strict_loads_refuses_a_byte_order_mark() -> None:
    with pytest.raises(ValueError, match="byte-order mark"):
        strict_loads(BOM + b'{"a": 1}')
    with pytest.raises(ValueError, match="byte-order mark"):
        strict_loads('\ufeff{"a": 1}')


def test_manifest_with_a_bom_is_refused_at_the_signature_step(
    tmp_path: Path, keys: tuple[Path, Path], device: tuple[Path, ModelStore, TrustStore]
) -> None:
    _, store, trust = device
    artifact = make_artifact(tmp_path / "bom", keys[0])
    (artifact / MANIFEST_FILE).write_bytes(BOM + (artifact / MANIFEST_FILE).read_bytes())
    before = tree_digest(store.root)
    with pytest.raises(ArtifactRejected, match="byte-order mark") as caught:
        store.install(artifact, trust, PROFILE, activate=True)
    assert caught.value.reason == "manifest" and tree_digest(store.root) == before


def test_an_unreadable_version_directory_breaks_no_other_install_or_listing(
    tmp_path: Path, keys: tuple[Path, Path], device: tuple[Path, ModelStore, TrustStore]
) -> None:
    state, store, trust = device
    store.install(make_artifact(tmp_path / "v1", keys[0]), trust, PROFILE, activate=True)
    manifest_path = store.version_dir("gemm", "1.0.0") / MANIFEST_FILE
    manifest_path.write_bytes(BOM + manifest_path.read_bytes())  # as an older agent stored it
    v2 = store.install(make_artifact(tmp_path / "v2", keys[0], version="2.0.0", release=2), trust, PROFILE)
    assert [m.version for m in store.versions("gemm")] == [v2.version]
    result = CliRunner().invoke(agent_cli, ["models", "--json", "--state-dir", str(state)])
    assert result.exit_code == 0, result.output
    assert [row["version"] for row in json.loads(result.stdout)] == ["2.0.0"]


def test_an_unreadable_version_directory_is_replaced_by_a_genuine_install(
    tmp_path: Path, keys: tuple[Path, Path], device: tuple[Path, ModelStore, TrustStore]
) -> None:
    _, store, trust = device
    artifact = make_artifact(tmp_path / "v1", keys[0])
    store.install(artifact, trust, PROFILE)
    (store.version_dir("gemm", "1.0.0") / MANIFEST_FILE).write_bytes(b"{not json")
    store.install(artifact, trust, PROFILE, activate=True)
    assert store.manifest("gemm", "1.0.0").version == "1.0.0"
    assert (store.version_dir("gemm", "1.0.0") / MANIFEST_FILE).read_bytes() == (artifact / MANIFEST_FILE).read_bytes()


# observation 4: the bytes kept are the bytes verified ---------------------------------------------
def test_a_manifest_swapped_after_verification_is_not_stored(
    tmp_path: Path, keys: tuple[Path, Path], device: tuple[Path, ModelStore, TrustStore],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    _, store, trust = device
    artifact = make_artifact(tmp_path / "a", keys[0])
    genuine = (artifact / MANIFEST_FILE).read_bytes()
    forged = json.loads(genuine)
    forged["release"] = 2**62
    verify = artifact_module.load_signed_manifest

    def verify_then_swap(manifest_bytes: bytes, signature_bytes: bytes, trust: TrustStore) -> Any:
        result = verify(manifest_bytes, signature_bytes, trust)
        (artifact / MANIFEST_FILE).write_text(json.dumps(forged))  # an attacker swaps it behind the check
        return result

    monkeypatch.setattr(artifact_module, "load_signed_manifest", verify_then_swap)
    store.install(artifact, trust, PROFILE, activate=True)
    assert (store.version_dir("gemm", "1.0.0") / MANIFEST_FILE).read_bytes() == genuine
    assert store.manifest("gemm", "1.0.0").release == 1


# observation 8: the no-op path still verifies ---------------------------------------------------
def test_reinstalling_a_corrupted_copy_of_the_installed_artifact_is_refused(
    tmp_path: Path, keys: tuple[Path, Path], device: tuple[Path, ModelStore, TrustStore]
) -> None:
    state, store, trust = device
    artifact = make_artifact(tmp_path / "a", keys[0])
    store.install(artifact, trust, PROFILE, activate=True)
    corrupted = shutil.copytree(artifact, tmp_path / "corrupted")
    model = bytearray((corrupted / "model.onnx").read_bytes())
    model[-1] ^= 0xFF
    (corrupted / "model.onnx").write_bytes(bytes(model))
    before = tree_digest(store.root)
    result = CliRunner().invoke(agent_cli, ["install", str(corrupted), "--state-dir", str(state)])
    assert result.exit_code != 0 and "installed and activated" not in result.output
    with pytest.raises(ArtifactRejected):
        store.install(corrupted, trust, PROFILE, activate=True)
    assert tree_digest(store.root) == before
    result = CliRunner().invoke(agent_cli, ["install", str(artifact), "--state-dir", str(state)])
    assert result.exit_code == 0, result.output
    assert "was already installed and active: files verified, nothing changed" in result.output
    assert tree_digest(store.root) == before


def test_reinstalling_repairs_a_damaged_installed_copy(
    tmp_path: Path, keys: tuple[Path, Path], device: tuple[Path, ModelStore, TrustStore]
) -> None:
    _, store, trust = device
    artifact = make_artifact(tmp_path / "a", keys[0])
    manifest = store.install(artifact, trust, PROFILE, activate=True)
    (store.version_dir("gemm", "1.0.0") / "model.onnx").write_bytes(b"rotten")
    store.install(artifact, trust, PROFILE, activate=True)
    verify_files(store.version_dir("gemm", "1.0.0"), manifest)  # intact again
    active = store.active("gemm")
    assert active is not None and active.artifact_id == manifest.artifact_id


def test_a_damaged_inactive_installed_copy_is_removed_to_be_fetched_again(
    tmp_path: Path, keys: tuple[Path, Path], device: tuple[Path, ModelStore, TrustStore]
) -> None:
    _, store, trust = device
    store.install(make_artifact(tmp_path / "v1", keys[0]), trust, PROFILE, activate=True)
    v2 = store.install(make_artifact(tmp_path / "v2", keys[0], version="2.0.0", release=2, seed=2), trust, PROFILE)
    (store.version_dir("gemm", "2.0.0") / "model.onnx").write_bytes(b"rotten")
    assert not store.activate_installed(v2.artifact_id, "gemm", None)
    assert [m.version for m in store.versions("gemm")] == ["1.0.0"]
    assert not list((store.root / "gemm" / "versions").glob(".*"))
    active = store.active("gemm")
    assert active is not None and active.version == "1.0.0"


def test_an_older_installed_release_is_not_activated_by_a_desired_state(
    tmp_path: Path, keys: tuple[Path, Path], device: tuple[Path, ModelStore, TrustStore]
) -> None:
    _, store, trust = device
    v1 = store.install(make_artifact(tmp_path / "v1", keys[0]), trust, PROFILE, activate=True)
    v2 = make_artifact(tmp_path / "v2", keys[0], version="2.0.0", release=2, seed=2)
    store.install(v2, trust, PROFILE, activate=True)
    assert not store.activate_installed(v1.artifact_id, "gemm", None)  # left to the downgrade check
    active = store.active("gemm")
    assert active is not None and active.version == "2.0.0"


# observation 1: kill points -----------------------------------------------------------------------
def agent_process(state: Path, kill_at: str | None = None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != KILL_POINT_ENV}
    if kill_at:
        env[KILL_POINT_ENV] = kill_at
    log = open(state / f"agent-{kill_at or 'run'}.log", "ab")  # noqa: SIM115 (the child owns it)
    return subprocess.Popen([sys.executable, "-c", "from edge_agent.cli import main; main()", "run", "--state-dir",
                             str(state)], stdout=log, stderr=log, env=env)  # fmt: skip


def reported(hub: Hub) -> dict[str, Any]:
    device = hub.registry.device("dev-1")
    models = ((device or {}).get("reported") or {}).get("models") or [{}]
    return dict(models[0])


def active_version(store: ModelStore) -> str | None:
    active = store.active("gemm")
    return active.version if active else None


def online(hub: Hub) -> bool:
    return any(d["status"] == "online" and d["profile"] for d in hub.registry.devices())


def killed_then_restarted(hub: Hub, state: Path, version: str, step: str | None, delay_s: float = 0.0) -> None:
    """Deploy ``version`` to an agent that SIGKILLs itself at ``step`` (or is SIGKILLed ``delay_s``
    after the deploy when ``step`` is None), then restart it and wait for a final reported state."""
    agent = agent_process(state, kill_at=step)
    try:
        wait_for("device online", lambda: online(hub))
        assert hub.control is not None
        hub.control.deploy("gemm", version, "device:dev-1")
        if step is None:
            time.sleep(delay_s)
            agent.kill()
        assert agent.wait(timeout=30) == -signal.SIGKILL
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    wait_for("status offline", lambda: not online(hub), timeout_s=60)  # the Last Will
    agent = agent_process(state)
    try:
        wait_for("a final state", lambda: reported(hub).get("version") == version
                 and reported(hub).get("state") in ("active", "failed"), timeout_s=60)  # fmt: skip
        wait_for("downloads cleaned up", lambda: not any((state / "downloads").glob("*")))
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=20)


def deployed_over_v1(hub: Hub, tmp_path: Path, keys: tuple[Path, Path], v2: Path) -> tuple[Path, ModelStore]:
    """A device with v1 installed and active (installed offline), and v2 registered at the hub."""
    state = tmp_path / "device"
    (state / "trust").mkdir(parents=True)
    shutil.copy(keys[1], state / "trust")
    AgentConfig(device_id="dev-1", profile=PROFILE.id, broker=hub.broker_url).save(state)
    store = ModelStore(state / "models")
    store.install(make_artifact(tmp_path / "v1", keys[0]), TrustStore.from_dir(state / "trust"), PROFILE, activate=True)
    manifest = hub.store.add(v2)
    hub.registry.add_artifact(manifest, hub.store.signature(manifest.artifact_id))
    return state, store


def test_at_least_20_distinct_kill_points_are_tested() -> None:
    """Issue 13: an install survives a kill at any step (>= 20 points), besides the random moments."""
    assert len(set(KILL_POINTS)) == len(KILL_POINTS) >= 20 and len(set(RANDOM_DELAYS_S)) == len(RANDOM_DELAYS_S)


def golden_v2(tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    """v2 with golden samples (so the install passes the golden kill point), 512-byte chunks: 13 of them."""
    v2 = make_artifact(tmp_path / "v2", keys[0], version="2.0.0", release=2, seed=2, golden=True, chunk_size=512)
    assert sum(len(f["chunks"]) for f in json.loads((v2 / MANIFEST_FILE).read_bytes())["files"]) == 13
    return v2


@pytest.mark.parametrize("step", KILL_POINTS)
def test_agent_killed_at_an_install_step_ends_active_on_the_new_version(
    step: str, hub: Hub, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    v2 = golden_v2(tmp_path, keys)
    state, store = deployed_over_v1(hub, tmp_path, keys, v2)
    killed_then_restarted(hub, state, "2.0.0", step)
    active = store.active("gemm")
    assert reported(hub)["state"] == "active", reported(hub)
    assert active is not None and active.version == "2.0.0" and active.previous == "1.0.0"
    assert not list((store.root / "gemm" / "versions").glob(".*"))  # no staging left


@pytest.mark.parametrize("delay_s", RANDOM_DELAYS_S)
def test_agent_killed_at_a_random_moment_ends_active_on_the_new_version(
    delay_s: float, hub: Hub, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    v2 = golden_v2(tmp_path, keys)
    state, store = deployed_over_v1(hub, tmp_path, keys, v2)
    killed_then_restarted(hub, state, "2.0.0", None, delay_s)
    active = store.active("gemm")
    assert reported(hub)["state"] == "active", reported(hub)
    assert active is not None and active.version == "2.0.0"


@pytest.mark.parametrize("step", ("published", "staged", "golden"))
def test_agent_killed_installing_a_failing_version_ends_failed_with_the_previous_serving(
    step: str, hub: Hub, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    """A model that fails its health check (zero input), or, at the golden kill point, one that was
    swapped for another model after its golden samples were taken (validly signed)."""
    if step == "golden":
        from test_golden_samples import swapped_artifact

        v2 = swapped_artifact(tmp_path / "v2", keys[0], version="2.0.0", release=2)
    else:
        v2 = broken_artifact(tmp_path / "v2", keys[0], version="2.0.0", release=2)
    state, store = deployed_over_v1(hub, tmp_path, keys, v2)
    killed_then_restarted(hub, state, "2.0.0", step)
    active = store.active("gemm")
    assert reported(hub)["state"] == "failed" and "downgrade" not in (reported(hub).get("error") or ""), reported(hub)
    assert active is not None and active.version == "1.0.0"
    if step == "golden":
        assert reported(hub)["error"].startswith("golden samples: "), reported(hub)


def test_the_state_an_install_killed_before_activation_leaves_converges(
    hub: Hub, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    """Observation 1 as found: v2 installed but not active, its download still on disk, then a restart."""
    v2 = make_artifact(tmp_path / "v2", keys[0], version="2.0.0", release=2, seed=2)
    state, store = deployed_over_v1(hub, tmp_path, keys, v2)
    store.install(v2, TrustStore.from_dir(state / "trust"), PROFILE)  # not activated: the kill window
    leftover = state / "downloads" / store.manifest("gemm", "2.0.0").artifact_id / "chunks"
    leftover.mkdir(parents=True)
    agent = agent_process(state)
    try:
        wait_for("device online", lambda: online(hub))
        assert hub.control is not None
        hub.control.deploy("gemm", "2.0.0", "device:dev-1")
        wait_for("a final state", lambda: reported(hub).get("version") == "2.0.0"
                 and reported(hub).get("state") in ("active", "failed"))  # fmt: skip
        assert reported(hub)["state"] == "active", reported(hub)
        wait_for("downloads cleaned up", lambda: not any((state / "downloads").glob("*")))
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=20)
    active = store.active("gemm")
    assert active is not None and active.version == "2.0.0"


@pytest.mark.parametrize("step", ("published", "golden", "checked"))
def test_the_journal_finishes_an_interrupted_install_on_start_with_no_broker(
    step: str, hub: Hub, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    v2 = golden_v2(tmp_path, keys)
    state, store = deployed_over_v1(hub, tmp_path, keys, v2)
    agent = agent_process(state, kill_at=step)
    try:
        wait_for("device online", lambda: online(hub))
        assert hub.control is not None
        hub.control.deploy("gemm", "2.0.0", "device:dev-1")
        assert agent.wait(timeout=30) == -signal.SIGKILL
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    AgentConfig(device_id="dev-1", profile=PROFILE.id, broker=f"mqtt://127.0.0.1:{free_port()}").save(state)
    agent = agent_process(state)  # nothing to connect to: no desired state will arrive
    try:
        wait_for("v2 active from the journal", lambda: active_version(store) == "2.0.0")
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=20)
    journal = json.loads((state / "journal" / "gemm.json").read_bytes())
    assert journal["step"] == "activated" and journal["artifact_id"] == store.manifest("gemm", "2.0.0").artifact_id
