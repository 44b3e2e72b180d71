"""Opt-in hard examples (issue 12): nothing is kept by default; an app that opts in keeps marked and
low-confidence samples in a capped device spool; the agent uploads them over MQTT to a real hub, which
stores each once and exports the arrays the app kept."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_artifact, wait_for
from test_hub_restarts import RunningAgent
from typer.testing import CliRunner

from cloud_hub.cli import app as hub_cli
from cloud_hub.examples import ExampleStore
from device_profiles import get_profile
from edge_agent import ConfigError, EdgeClient, HardExamples
from edge_agent.config import AgentConfig
from edge_agent.example_spool import ExampleSpool, spool_dir
from edge_agent.examples import ExampleKeeper, row_confidence, to_npz
from edge_agent.protocol.errors import MessageError
from edge_agent.protocol.messages import (
    MAX_EXAMPLE_BYTES,
    ExampleHeader,
    HardExample,
    HardExampleAck,
    from_wire,
    to_wire,
)
from edge_agent.protocol.signing import TrustStore
from edge_agent.store import KILL_POINT_ENV, ModelStore

X = np.random.default_rng(7).standard_normal((64, 32)).astype(np.float32)


def installed(tmp_path: Path, keys: tuple[Path, Path], device: tuple[Path, ModelStore, TrustStore]) -> Path:
    state, store, trust = device
    manifest = store.install(make_artifact(tmp_path / "gemm", keys[0]), trust, get_profile("x86-64-generic"))
    store.activate(manifest.name, manifest.version)
    return state


def example(example_id: str = "a" * 32, npz: bytes | None = None) -> HardExample:
    arrays = to_npz({"input": np.arange(4, dtype=np.float32)}, None) if npz is None else npz
    return HardExample(ExampleHeader(example_id, "dev-1", "gemm", "1.0.0", "test", 1.0), arrays)


def test_the_codec_round_trips_and_refuses_what_is_too_big_or_malformed() -> None:
    sent = example()
    assert HardExample.from_wire(sent.to_wire()) == sent
    assert from_wire(HardExampleAck, to_wire(HardExampleAck("a" * 32, "no"))) == HardExampleAck("a" * 32, "no")
    with pytest.raises(MessageError, match="over the limit of 1048576 bytes"):
        example(npz=b"x" * MAX_EXAMPLE_BYTES).to_wire()
    with pytest.raises(MessageError, match="over the limit"):
        HardExample.from_wire(b"EFX1" + b"x" * MAX_EXAMPLE_BYTES)
    with pytest.raises(MessageError, match="example_id"):
        example("not-hex")
    with pytest.raises(MessageError, match="missing EFX1 header"):
        HardExample.from_wire(b"EFC1....")
    with pytest.raises(MessageError, match="runs past"):
        HardExample.from_wire(b"EFX1\x00\x00\x10\x00{}")


def test_a_default_client_keeps_nothing(tmp_path: Path, keys: tuple[Path, Path], device: Any) -> None:
    state = installed(tmp_path, keys, device)
    with EdgeClient(state, telemetry=False) as client:
        for row in X:
            client.infer("gemm", {"input": row[None]})
        with pytest.raises(ConfigError, match=r"hard_examples=HardExamples\(\)"):
            client.keep_example("gemm", {"input": X[:1]})
        assert client.example_counters() == {}
    assert not spool_dir(state).exists()


def test_an_app_that_opts_in_keeps_marked_and_low_confidence_samples(
    tmp_path: Path, keys: tuple[Path, Path], device: Any
) -> None:
    state = installed(tmp_path, keys, device)
    with EdgeClient(state, telemetry=False) as plain:
        scores = row_confidence(plain.infer("gemm", {"input": X}).outputs["output"], "max_softmax")
    low, high = int(scores.argmin()), int(scores.argmax())
    threshold = float(scores[low] + scores[high]) / 2
    config = HardExamples(low_confidence_below=threshold)
    with EdgeClient(state, telemetry=False, hard_examples=config) as client:
        confident = client.infer("gemm", {"input": X[high : high + 1]})
        unsure = client.infer("gemm", {"input": X[low : low + 1]})
        marked = client.keep_example("gemm", X[:2], reason="user corrected the label")  # a bare array
        counters = client.example_counters()
    assert marked is not None and confident.outputs and counters["kept"] == 2 and counters["spooled"] == 2
    kept = [HardExample.from_wire(e.path.read_bytes()) for e in ExampleSpool(spool_dir(state)).entries()]
    by_reason = {k.header.reason.split(":")[0]: k for k in kept}
    arrays = np.load(io.BytesIO(by_reason["low confidence"].npz))
    np.testing.assert_array_equal(arrays["input/input"], X[low : low + 1])
    np.testing.assert_array_equal(arrays["output/output"], unsure.outputs["output"])
    assert by_reason["user corrected the label"].header.example_id == marked
    assert by_reason["low confidence"].header.version == "1.0.0"


def test_the_device_spool_drops_the_oldest_past_its_caps_and_counts_refusals(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = ExampleSpool(tmp_path / "examples")
    keeper = ExampleKeeper(spool, HardExamples(max_examples=3, max_example_bytes=4096), "dev-1")
    ids = [keeper.keep("m", "1", {"x": np.full(8, i, np.float32)}, None, f"n{i}") for i in range(5)]
    too_big = keeper.keep("m", "1", {"x": np.zeros(2048, np.float32)}, None, "big")  # 8 KiB > 4 KiB
    assert keeper.flush()
    keeper.close()
    assert too_big is None
    assert [e.example_id for e in spool.entries()] == ids[2:]  # the newest three, oldest first
    assert spool.status() | {"spooled_bytes": 0} == {
        "kept": 5, "dropped_full": 2, "refused_too_large": 1, "dropped_queue": 0, "rate_limited": 0, "unchecked": 0,
        "uploaded": 0, "refused_by_hub": 0, "unreadable": 0, "write_failed": 0, "spooled": 3, "spooled_bytes": 0,
    }  # fmt: skip
    size = spool.entries()[0].size
    keeper = ExampleKeeper(spool, HardExamples(max_examples=100, max_bytes=2 * size + 10), "dev-1")
    keeper.keep("m", "1", {"x": np.ones(8, np.float32)}, None, "n5")
    keeper.close()
    assert len(spool.entries()) == 2 and spool.counters()["dropped_full"] == 4  # the byte cap
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # the writer never failed


def test_text_examples_are_kept_as_unicode_and_one_that_cannot_be_written_is_counted(tmp_path: Path) -> None:
    from cloud_hub.examples import array_names

    spool = ExampleSpool(tmp_path / "examples")
    keeper = ExampleKeeper(spool, HardExamples(), "dev-1")
    text = np.array([[b"caf\xc3\xa9", b"ok"]], dtype=object)  # a BYTES tensor, as the runtimes give it
    kept = keeper.keep("m", "1", {"text": text}, {"label": np.array(["yes"], dtype=object)}, "marked")
    lost = keeper.keep("m", "1", {"x": np.array([object()], dtype=object)}, None, "not text")
    assert kept is not None and lost is not None  # ids returned before the writer runs
    assert keeper.flush()
    keeper.close()
    (entry,) = spool.entries()
    assert entry.example_id == kept
    npz = HardExample.from_wire(entry.path.read_bytes()).npz
    assert array_names(npz) == ["input/text", "output/label"]  # what the hub reads, without pickles
    np.testing.assert_array_equal(np.load(io.BytesIO(npz))["input/text"], [["café", "ok"]])
    assert spool.counters()["kept"] == 1 and spool.counters()["write_failed"] == 1


def test_the_hub_stores_an_example_once_refuses_unreadable_arrays_and_caps_each_device(tmp_path: Path) -> None:
    store = ExampleStore(tmp_path / "examples", max_per_device=2)
    ids = [f"{i:032x}" for i in range(3)]
    assert store.add("dev-1", example(ids[0])) and not store.add("dev-1", example(ids[0]))
    with pytest.raises(ValueError, match=r"not a readable \.npz"):
        store.add("dev-1", example(ids[1], npz=b"not an npz"))
    store.add("dev-1", example(ids[1]))
    store.add("dev-1", example(ids[2]))
    assert [r["example_id"] for r in store.list(model="gemm")] == [ids[2], ids[1]]
    assert store.counters == {"stored": 3, "duplicates": 1, "dropped": 1, "refused": 1}
    assert not (tmp_path / "examples" / f"{ids[0]}.npz").exists()
    store.close()


def test_the_hub_refuses_arrays_that_expand_past_the_limit_before_decompressing_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cloud_hub.examples import MAX_EXPANDED_BYTES

    buffer = io.BytesIO()
    np.savez_compressed(buffer, zeros=np.zeros(2 * MAX_EXPANDED_BYTES, np.uint8))  # a zip bomb, ~32 KiB
    bomb = buffer.getvalue()
    assert len(bomb) < MAX_EXAMPLE_BYTES
    store = ExampleStore(tmp_path / "examples")
    store.add("dev-1", example("0" * 32))  # within the limit: stored as before

    def load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("decompressed")

    monkeypatch.setattr(np, "load", load)
    with pytest.raises(ValueError, match=r"expand to \d+ bytes, over the limit"):
        store.add("dev-1", example("1" * 32, npz=bomb))
    assert store.counters == {"stored": 1, "duplicates": 0, "dropped": 0, "refused": 1}
    assert [r["example_id"] for r in store.list()] == ["0" * 32]
    store.close()


def hub_cli_run(hub: Any, *args: str) -> Any:
    where = ["--hub", f"http://127.0.0.1:{hub.admin.port}", "--state-dir", str(hub.config.state_dir)]
    result = CliRunner().invoke(hub_cli, ["examples", *args, *where], env={"EDGEFED_HUB_TOKEN": ""})
    assert result.exit_code == 0, result.output
    return result


def test_the_agent_uploads_kept_examples_and_the_hub_exports_them(
    hub: Any, tmp_path: Path, keys: tuple[Path, Path], device: Any
) -> None:
    state = installed(tmp_path, keys, device)
    with EdgeClient(state, telemetry=False, hard_examples=HardExamples(low_confidence_below=1.0)) as client:
        result = client.infer("gemm", {"input": X[:3]})  # every row is below 1.0
        client.keep_example("gemm", {"input": X[5:6]}, {"output": result.outputs["output"][:1]}, reason="marked")
        assert client.example_counters()["kept"] == 2
    agent = RunningAgent(state, hub.broker_url, keys)
    try:
        wait_for("the hub to store both", lambda: len(hub.examples.list()) == 2)
        wait_for("the device spool to empty", lambda: not ExampleSpool(spool_dir(state)).entries())
    finally:
        agent.stop()
    assert ExampleSpool(spool_dir(state)).counters()["uploaded"] == 2
    listed = json.loads(hub_cli_run(hub, "list", "--model", "gemm", "--json").stdout)
    assert {r["reason"].split(":")[0] for r in listed} == {"marked", "low confidence"}
    assert {r["device_id"] for r in listed} == {"dev-1"}
    hub_cli_run(hub, "export", "--model", "gemm", "--out", str(tmp_path / "export"))
    index = {e["reason"].split(":")[0]: e for e in json.loads((tmp_path / "export" / "index.json").read_text())}
    marked = np.load(tmp_path / "export" / index["marked"]["file"])
    np.testing.assert_array_equal(marked["input/input"], X[5:6])
    np.testing.assert_array_equal(marked["output/output"], result.outputs["output"][:1])
    unsure = np.load(tmp_path / "export" / index["low confidence"]["file"])
    np.testing.assert_array_equal(unsure["input/input"], X[:3])
    np.testing.assert_array_equal(unsure["output/output"], result.outputs["output"])
    assert "gemm@1.0.0" in hub_cli_run(hub, "list").stdout


def agent_process(state: Path, kill_at: str | None = None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != KILL_POINT_ENV}
    if kill_at:
        env[KILL_POINT_ENV] = kill_at
    log = open(state / f"agent-{kill_at or 'run'}.log", "ab")  # noqa: SIM115 (the child owns it)
    return subprocess.Popen([sys.executable, "-c", "from edge_agent.cli import main; main()", "run", "--state-dir",
                             str(state)], stdout=log, stderr=log, env=env)  # fmt: skip


def test_an_agent_killed_before_the_ack_sends_again_and_the_hub_stores_once(
    hub: Any, tmp_path: Path, keys: tuple[Path, Path], device: Any
) -> None:
    state = device[0]
    AgentConfig(device_id="dev-1", profile="x86-64-generic", broker=hub.broker_url).save(state)
    keeper = ExampleKeeper(ExampleSpool(spool_dir(state)), HardExamples(), "dev-1")
    example_id = keeper.keep("gemm", "1.0.0", {"input": X[:1]}, None, "marked")
    keeper.close()
    first = agent_process(state, kill_at="example-ack")  # SIGKILLs itself as the hub's ack arrives
    try:
        assert first.wait(timeout=60) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
    assert [r["example_id"] for r in hub.examples.list()] == [example_id]
    assert [e.example_id for e in ExampleSpool(spool_dir(state)).entries()] == [example_id]  # not acknowledged
    second = agent_process(state)
    try:
        wait_for("the example to be acknowledged", lambda: not ExampleSpool(spool_dir(state)).entries())
    finally:
        second.terminate()
        second.wait(timeout=30)
    assert [r["example_id"] for r in hub.examples.list()] == [example_id]  # stored once
    assert hub.examples.counters["stored"] == 1 and hub.examples.counters["duplicates"] == 1
    np.testing.assert_array_equal(np.load(io.BytesIO(hub.examples.read(example_id)))["input/input"], X[:1])


def test_options_are_checked_and_an_example_the_hub_refuses_is_dropped_on_the_device(
    hub: Any, tmp_path: Path, keys: tuple[Path, Path], device: Any
) -> None:
    with pytest.raises(ConfigError, match=r"HardExamples\.low_confidence_below: 1\.5 is not in"):
        HardExamples(low_confidence_below=1.5)
    with pytest.raises(ConfigError, match=r"HardExamples\.max_example_bytes: at most 1047552"):
        HardExamples(max_example_bytes=MAX_EXAMPLE_BYTES)
    state = device[0]
    spool = ExampleSpool(spool_dir(state))
    spool.add(example("b" * 32, npz=b"not an npz"), 10, 1 << 20)  # a frame the hub reads, arrays it cannot
    agent = RunningAgent(state, hub.broker_url, keys)
    try:
        wait_for("the device to drop it", lambda: spool.counters()["refused_by_hub"] == 1)
    finally:
        agent.stop()
    assert not spool.entries() and not hub.examples.list() and hub.examples.counters["refused"] == 1
