"""The spool's cap and full policy (drop_oldest, reject_new): set from agent.json or arguments, never
exceeded, and generated = delivered + counted drops whatever the policy, with batches resent and
deduplicated as the hub does; and the spool's own file checks never drop SQLite's locks."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edge_agent.cli import app as agent_cli
from edge_agent.config import AgentConfig
from edge_agent.errors import ConfigError
from edge_agent.protocol.messages import TelemetryBatch
from edge_agent.telemetry import MAX_SPOOL_CALLS, CallBlock, Spool, TelemetryRecorder


class Hub:
    """What the hub does with batches: stores each (epoch, seq) once and acknowledges every one."""

    def __init__(self) -> None:
        self.stored: dict[tuple[str, int], TelemetryBatch] = {}

    def receive(self, batch: TelemetryBatch) -> None:
        self.stored.setdefault((batch.epoch, batch.seq), batch)

    @property
    def delivered(self) -> int:
        return sum(w.count for b in self.stored.values() for w in b.windows)

    @property
    def dropped(self) -> int:
        return sum(b.dropped for b in self.stored.values())

    def timestamps(self) -> list[tuple[float, float]]:
        return sorted((w.start, w.end) for b in self.stored.values() for w in b.windows)


def drain(spool: Spool, hub: Hub, rng: random.Random, lose_acks: float) -> None:
    """Send batches until the spool is empty; some acknowledgements are lost (the batch is sent again)."""
    while (batch := spool.next_batch("dev", limit_rows=3)) is not None:
        hub.receive(batch)
        if rng.random() >= lose_acks:
            spool.acknowledge(batch.seq, batch.epoch)


@pytest.mark.parametrize("policy", ["drop_oldest", "reject_new"])
def test_generated_equals_delivered_plus_counted_drops_under_a_small_cap(tmp_path: Path, policy: str) -> None:
    rng = random.Random(12)
    cap = 40
    spool = Spool(tmp_path / "telemetry.db", max_calls=cap, full_policy=policy)
    recorder = TelemetryRecorder(spool, flush_interval_s=3600.0)
    recorder.queue_size = 30  # the queue overflows too: those drops count the same way
    hub, generated, most = Hub(), 0, 0
    for _ in range(200):
        for _ in range(rng.randint(0, 45)):
            recorder.record("m", "1", rng.choice(["local", "cloud"]), 1.0, True)
            generated += 1
        recorder.flush()
        most = max(most, spool.pending_calls())
        assert spool.counter("spooled") == spool.pending_calls()
        if rng.random() < 0.2:  # the hub is reachable now and then
            drain(spool, hub, rng, lose_acks=0.3)
    recorder.close()
    drain(spool, hub, rng, lose_acks=0.0)
    assert most <= cap
    assert hub.dropped == spool.counter("dropped") > 0  # every drop counted, and reported
    assert generated == hub.delivered + hub.dropped


def test_drop_oldest_keeps_the_newest_calls_and_reject_new_the_oldest(tmp_path: Path) -> None:
    def block(t0: float, n: int) -> CallBlock:
        return CallBlock("m", "1", "local", np.arange(t0, t0 + n, dtype=np.float64), np.ones(n, np.float32),
                         np.ones(n, np.uint8))  # fmt: skip

    kept = {}
    for policy in ("drop_oldest", "reject_new"):
        spool = Spool(tmp_path / f"{policy}.db", max_calls=10, full_policy=policy)
        for t0 in (0, 100, 200):
            spool.append([block(t0, 6)])
        hub = Hub()
        drain(spool, hub, random.Random(0), lose_acks=0.0)
        assert hub.delivered == 10 if policy == "reject_new" else hub.delivered == 6  # whole rows go
        assert hub.delivered + hub.dropped == 18
        kept[policy] = hub.timestamps()
    assert kept["drop_oldest"] == [(200.0, 205.0)]  # the last write
    assert kept["reject_new"] == [(0.0, 103.0)]  # the first write and the first 4 calls of the second


def test_the_cap_and_policy_come_from_agent_json(tmp_path: Path) -> None:
    assert Spool(tmp_path / "telemetry.db").max_calls == MAX_SPOOL_CALLS == 1_000_000
    assert Spool(tmp_path / "telemetry.db").full_policy == "drop_oldest"
    state = tmp_path / "state"
    AgentConfig("dev", "x86-64-generic", spool_max_calls=500, spool_full="reject_new").save(state)
    spool = Spool(state / "telemetry.db")
    assert (spool.max_calls, spool.full_policy) == (500, "reject_new")
    assert Spool(state / "telemetry.db", max_calls=7, full_policy="drop_oldest").max_calls == 7  # arguments win
    with pytest.raises(ValueError, match="reject_new"):
        Spool(state / "telemetry.db", full_policy="drop_newest")


@pytest.mark.parametrize(
    ("field", "value"), [("spool_max_calls", 0), ("spool_max_calls", 1.5), ("spool_full", "drop_newest")]
)
def test_a_bad_spool_setting_in_agent_json_is_named(tmp_path: Path, field: str, value: object) -> None:
    AgentConfig("dev", "x86-64-generic").save(tmp_path)
    data = json.loads((tmp_path / "agent.json").read_text())
    (tmp_path / "agent.json").write_text(json.dumps({**data, field: value}))
    with pytest.raises(ConfigError, match=field):
        AgentConfig.load(tmp_path)


def test_edge_agent_init_sets_the_spool_cap_and_policy(tmp_path: Path) -> None:
    from edge_agent.protocol.signing import generate_keypair

    _, pub = generate_keypair(tmp_path / "keys")
    state = tmp_path / "state"
    args = ["init", "--device-id", "dev", "--trust", str(pub), "--profile", "x86-64-generic", "--state-dir", str(state)]
    result = CliRunner().invoke(agent_cli, [*args, "--spool-max-calls", "2000", "--spool-full", "reject_new"])
    assert result.exit_code == 0, result.output
    config = AgentConfig.load(state)
    assert (config.spool_max_calls, config.spool_full) == (2000, "reject_new")
    result = CliRunner().invoke(agent_cli, [*args, "--spool-full", "oldest"])
    assert result.exit_code == 2 and "spool_full" in result.output


def test_checking_the_spool_file_keeps_the_writers_locks(tmp_path: Path) -> None:
    """An app's writer keeps its connection open and checks the file before each write. Opening and
    closing the file for that check dropped the process's POSIX locks: the agent's next connection to
    close then found itself alone, checkpointed and deleted the WAL under the app (a corrupted spool
    within seconds of an app and an agent running together)."""
    path = tmp_path / "telemetry.db"
    spool = Spool(path)
    calls = CallBlock("m", "1", "local", np.ones(5), np.ones(5, np.float32), np.ones(5, np.uint8))
    spool.append([calls])  # the write connection stays open
    assert spool.counter("spooled") == 5  # checks the file
    other_process = (
        "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); db.execute('SELECT 1 FROM calls'); db.close()"
    )
    subprocess.run([sys.executable, "-c", other_process, str(path)], check=True)
    assert Path(f"{path}-wal").exists()  # the other connection knew it was not the last one
    spool.append([calls])
    assert spool.pending_calls() == 10 and spool.counter("spool_resets") == 0
