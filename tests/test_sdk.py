"""EdgeClient and runtimes: LiteRT and ORT, hot swap under load, cache, batch/async, telemetry, and the
store under crashes and concurrent processes."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import ROOT, make_artifact, tree_digest
from tflite_builder import dense_tflite

from device_profiles import get_profile
from edge_agent import EdgeClient
from edge_agent.agent import health_check
from edge_agent.config import AgentConfig
from edge_agent.protocol.artifact import seal
from edge_agent.protocol.manifest import Manifest, format_time
from edge_agent.protocol.signing import TrustStore, load_private_key
from edge_agent.store import ModelStore
from edge_agent.telemetry import Spool

PROFILE = get_profile("x86-64-generic")
X = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)


def install(store: ModelStore, trust: TrustStore, artifact: Path) -> str:
    manifest = store.install(artifact, trust, PROFILE)
    store.activate(manifest.name, manifest.version)
    return manifest.version


def reference_outputs(artifact: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(artifact / "model.onnx")).run(None, {"input": x})[0]


def test_ort_runtime_matches_raw_onnxruntime(tmp_path: Path, keys: tuple[Path, Path], device: tuple) -> None:
    state, store, trust = device
    artifact = make_artifact(tmp_path / "a", keys[0])
    install(store, trust, artifact)
    with EdgeClient(state, telemetry=False) as client:
        result = client.infer("gemm", {"input": X})
    np.testing.assert_allclose(result.outputs["output"], reference_outputs(artifact, X), rtol=1e-6)


def test_litert_runtime_runs_a_tflite_artifact(
    tmp_path: Path, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    text = (ROOT / "device_profiles/profiles/x86-64-generic.toml").read_text()
    (profiles / "x86-64-litert.toml").write_text(
        text.replace('id = "x86-64-generic"', 'id = "x86-64-litert"').replace(
            'runtimes = ["onnxruntime"]', 'runtimes = ["tflite"]'
        )
    )
    monkeypatch.setenv("EDGEFED_PROFILE_PATH", str(profiles))
    rng = np.random.default_rng(3)
    weight, bias = rng.standard_normal((32, 30)).astype(np.float32), rng.standard_normal(30).astype(np.float32)
    artifact = tmp_path / "tfl"
    artifact.mkdir()
    dense_tflite(artifact / "model.tflite", weight, bias)
    now = datetime.now(UTC)
    seal(artifact, {
        "name": "dense", "version": "1.0.0", "release": 1, "runtime": "tflite", "precision": "fp32",
        "hardware": {"profile": "x86-64-litert", "arch": "x86_64", "accelerator": "none"},
        "inputs": [{"name": "input", "dtype": "float32", "shape": ["batch", 32]}],
        "outputs": [{"name": "output", "dtype": "float32", "shape": ["batch", 30]}],
        "source_sha256": "0" * 64, "created_at": format_time(now), "expires_at": format_time(now + timedelta(days=1)),
    }, load_private_key(keys[0]))  # fmt: skip
    state = tmp_path / "device"
    (state / "trust").mkdir(parents=True)
    shutil.copy(keys[1], state / "trust")
    AgentConfig(device_id="pi", profile="x86-64-litert").save(state)
    store = ModelStore(state / "models")
    manifest = store.install(artifact, TrustStore.from_dir(state / "trust"), get_profile("x86-64-litert"))
    store.activate(manifest.name, manifest.version)
    with EdgeClient(state, telemetry=False) as client:
        for batch in (1, 4, 2):  # resizes the interpreter's input on demand
            result = client.infer("dense", {"input": X[:batch]})
            np.testing.assert_allclose(result.outputs["output"], X[:batch] @ weight + bias, rtol=1e-4, atol=1e-4)
        assert result.route == "local"


def test_hot_swap_under_load_never_fails_or_mixes_versions(
    tmp_path: Path, keys: tuple[Path, Path], device: tuple
) -> None:
    state, store, trust = device
    artifacts = {f"{r}.0.0": make_artifact(tmp_path / f"v{r}", keys[0], version=f"{r}.0.0", release=r, seed=r)
                 for r in (1, 2, 3)}  # fmt: skip
    expected = {v: reference_outputs(a, X) for v, a in artifacts.items()}
    for artifact in artifacts.values():
        store.install(artifact, trust, PROFILE)
    store.activate("gemm", "1.0.0")
    errors: list[BaseException] = []
    seen: dict[str, int] = {}
    stop = threading.Event()
    with EdgeClient(state, telemetry=False) as client:

        def caller() -> None:
            while not stop.is_set():
                try:
                    result = client.infer("gemm", {"input": X})
                    np.testing.assert_allclose(result.outputs["output"], expected[result.version], rtol=1e-6)
                    seen[result.version] = seen.get(result.version, 0) + 1
                except BaseException as exc:
                    errors.append(exc)
                    return

        threads = [threading.Thread(target=caller) for _ in range(8)]
        for thread in threads:
            thread.start()
        versions = list(expected)
        for swap in range(50):
            store.activate("gemm", versions[swap % 3])
            deadline = threading.Event()
            deadline.wait(0.03)
        stop.set()
        for thread in threads:
            thread.join()
        swaps = client._active.slots["gemm"].swaps
    assert errors == []
    assert set(seen) == set(versions) and sum(seen.values()) > 1000
    assert swaps >= 10  # the client really followed the pointer, in the background


KILL_DURING_ACTIVATE = """
import os, signal, sys
from pathlib import Path
from edge_agent.store import ModelStore
real_replace = os.replace
def crash(src, dst):
    if str(dst).endswith("active.json"):
        os.kill(os.getpid(), signal.SIGKILL)  # after the new pointer is written and fsynced, before the rename
    real_replace(src, dst)
os.replace = crash
ModelStore(Path(sys.argv[1])).activate("gemm", "2.0.0")
"""


def test_process_killed_before_rename_leaves_old_version_active(
    tmp_path: Path, keys: tuple[Path, Path], device: tuple
) -> None:
    state, store, trust = device
    install(store, trust, make_artifact(tmp_path / "v1", keys[0]))
    store.install(make_artifact(tmp_path / "v2", keys[0], version="2.0.0", release=2, seed=2), trust, PROFILE)
    before = {p: tree_digest(store.version_dir("gemm", v)) for p, v in (("v1", "1.0.0"), ("v2", "2.0.0"))}
    pointer = store.active_path("gemm").read_bytes()
    child = subprocess.run([sys.executable, "-c", KILL_DURING_ACTIVATE, str(store.root)], capture_output=True)
    assert child.returncode == -9
    assert store.active_path("gemm").read_bytes() == pointer
    assert store.active("gemm").version == "1.0.0"  # type: ignore[union-attr]
    after = {p: tree_digest(store.version_dir("gemm", v)) for p, v in (("v1", "1.0.0"), ("v2", "2.0.0"))}
    assert after == before
    with EdgeClient(state, telemetry=False) as client:
        assert client.infer("gemm", {"input": X}).version == "1.0.0"
    assert store.activate("gemm", "2.0.0").version == "2.0.0"  # the store still works after the crash



def test_install_with_activate_runs_the_check_under_the_writer_lock(
    tmp_path: Path, keys: tuple[Path, Path], device: tuple
) -> None:
    _, store, trust = device
    install(store, trust, make_artifact(tmp_path / "a", keys[0]))
    newer = make_artifact(tmp_path / "b", keys[0], version="2.0.0", release=2)

    def failing_check(directory: Path, manifest: Manifest) -> None:
        assert manifest.version == "2.0.0" and (directory / "model.onnx").is_file()
        raise RuntimeError("health check produced non-finite outputs")

    with pytest.raises(RuntimeError, match="non-finite"):
        store.install(newer, trust, PROFILE, activate=True, check=failing_check)
    assert store.active("gemm").version == "1.0.0"  # a failed check leaves the active version alone
    store.install(newer, trust, PROFILE, activate=True, check=partial(health_check, profile=PROFILE))
    assert (store.active("gemm").version, store.active("gemm").previous) == ("2.0.0", "1.0.0")


CONCURRENT_WORKER = """
import sys
from pathlib import Path
import numpy as np
from device_profiles import get_profile
from edge_agent import EdgeClient
from edge_agent.protocol.errors import ArtifactRejected
from edge_agent.protocol.signing import TrustStore
from edge_agent.store import ModelStore
state, artifacts = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
store, calls = ModelStore(state / "models"), 0
with EdgeClient(state) as client:
    for artifact in artifacts:
        try:
            store.install(artifact, TrustStore.from_dir(state / "trust"), get_profile("x86-64-generic"), activate=True)
        except ArtifactRejected as exc:  # another process installed and activated a higher release first
            assert exc.reason == "downgrade", exc
        for _ in range(50):
            client.infer("gemm", {"input": np.ones((1, 32), np.float32)})
            calls += 1
print("calls", calls)
"""


def test_concurrent_processes_share_the_store(tmp_path: Path, keys: tuple[Path, Path], device: tuple) -> None:
    state, store, _ = device
    releases = range(1, 13)
    artifacts = [make_artifact(tmp_path / f"r{r}", keys[0], version=f"{r}.0.0", release=r, seed=r) for r in releases]
    workers = [subprocess.Popen([sys.executable, "-c", CONCURRENT_WORKER, str(state), *map(str, artifacts[i::3])],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(3)]  # fmt: skip
    outcomes = [w.communicate(timeout=120) for w in workers]
    for worker, (_, err) in zip(workers, outcomes, strict=True):
        assert worker.returncode == 0, err.decode()[-2000:]
    active = store.active("gemm")
    assert active is not None and active.release == 12  # install and activate are one step: never a downgrade
    assert store.manifest("gemm", active.version).release == active.release
    assert not list((store.root / "gemm" / "versions").glob(".staging-*"))
    calls = sum(int(out.split()[-1]) for out, _ in outcomes)
    assert calls >= 50 and Spool(state / "telemetry.db").pending_calls() == calls


def test_cache_batch_async_and_telemetry(tmp_path: Path, keys: tuple[Path, Path], device: tuple,
                                         digits_artifact: dict) -> None:  # fmt: skip
    state, store, trust = device
    install(store, trust, digits_artifact["path"])
    x = digits_artifact["x"][:6]
    with EdgeClient(state, cache_size=16) as client:
        first = client.infer("digits-cnn", {"input": x[:1]})
        again = client.infer("digits-cnn", {"input": x[:1].copy()})
        assert not first.cached and again.cached
        np.testing.assert_array_equal(first.outputs["output"], again.outputs["output"])
        assert not client.infer("digits-cnn", {"input": x[1:2]}).cached
        parts = client.infer_batch("digits-cnn", [{"input": x[:2]}, {"input": x[2:3]}, {"input": x[3:6]}])
        assert [len(p.outputs["output"]) for p in parts] == [2, 1, 3]
        whole = client.infer("digits-cnn", {"input": x})
        np.testing.assert_allclose(
            np.concatenate([p.outputs["output"] for p in parts]), whole.outputs["output"], rtol=1e-5
        )
        result = asyncio.run(client.ainfer("digits-cnn", x[:1]))  # a bare array for a one-input model
        assert result.route == "local" and result.outputs["output"].shape == (1, 10)
    batch = Spool(state / "telemetry.db").next_batch("dev-1")
    assert batch is not None
    routes = {w.route: w.count for w in batch.windows}
    assert routes == {"cache": 3, "local": 3}  # `whole` repeats the batch's input and `ainfer` the first
    features = {h.tensor: h for h in batch.histograms}
    assert {f"input/{i}" for i in range(64)} <= set(features)  # one histogram per pixel
    assert {"output/class", "output/confidence"} <= set(features)
    pixel = features["input/27"]
    assert sum(pixel.counts) == 1 + 1 + 6  # every computed (not cached) call, once per feature
    assert len(pixel.edges) == len(pixel.counts) + 1 and pixel.summarised == 3  # calls, of 8 samples


def test_full_queue_drops_are_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keys: tuple[Path, Path],
                                      device: tuple) -> None:  # fmt: skip
    import edge_agent.telemetry as telemetry

    state, store, trust = device
    install(store, trust, make_artifact(tmp_path / "a", keys[0]))
    monkeypatch.setattr(telemetry, "QUEUE_SIZE", 10)
    monkeypatch.setattr(telemetry, "FLUSH_INTERVAL_S", 3600.0)
    with EdgeClient(state) as client:
        for _ in range(25):
            client.infer("gemm", {"input": X})
    spool = Spool(state / "telemetry.db")
    assert spool.pending_calls() + spool.counter("dropped") == 25
    assert spool.counter("dropped") == 15
    batch = spool.next_batch("dev-1")
    assert batch is not None and batch.dropped == 15 and batch.windows[0].count == 10
