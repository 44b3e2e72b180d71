"""Telemetry identity (issue 11, observations 7 and 8): a spool epoch that keeps a re-initialised device's
batches apart from its old ones at the hub, a registry file from before epochs migrated, a spool deleted
or corrupted under a running recorder made again with the gap counted, dropped calls shown by
`cloud-hub telemetry`, and NaN, infinity or negative counts refused before they reach the hub's store."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_telemetry import OLD_SCHEMA, recorder
from typer.testing import CliRunner

from cloud_hub.cli import app as hub_cli
from cloud_hub.cli import fleet
from cloud_hub.registry import SQLiteRegistry
from edge_agent.protocol.errors import MessageError
from edge_agent.protocol.messages import TelemetryBatch, TelemetryWindow, from_wire, to_wire
from edge_agent.telemetry import Spool, TelemetryRecorder

# the registry's telemetry table before epochs, as sqlite-utils made it (verbatim)
OLD_TELEMETRY_TABLE = """CREATE TABLE "telemetry" (
   "device_id" TEXT,
   "seq" INTEGER,
   "received" REAL,
   "dropped" INTEGER,
   "windows" TEXT,
   "histograms" TEXT,
   PRIMARY KEY ("device_id", "seq")
)"""
WINDOW = {"model": "m", "version": "1", "route": "local", "start": 1.0, "end": 2.0, "count": 4, "errors": 0,
          "latency_ms_sum": 4.0, "latency_hist": [4], "budget_breaches": 0}  # fmt: skip


def record(rec: TelemetryRecorder, calls: int) -> None:
    for _ in range(calls):
        rec.record("m", "1", "local", 1.0, True)


def upload(spool: Spool, registry: SQLiteRegistry) -> list[bool]:
    """What the agent and hub do: send the oldest batch over the wire, store it, acknowledge it."""
    stored = []
    while (batch := spool.next_batch("dev")) is not None:
        stored.append(registry.add_telemetry(from_wire(TelemetryBatch, to_wire(batch))))
        spool.acknowledge(batch.seq)
    return stored


def remove_spool(path: Path) -> None:
    """The spool's files, the database last: its disappearance is what a running writer notices."""
    for suffix in ("-wal", "-shm", ""):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def test_a_reinitialised_device_is_not_discarded_as_duplicates(tmp_path: Path) -> None:
    registry, path = SQLiteRegistry(str(tmp_path / "registry.db")), tmp_path / "telemetry.db"
    first = recorder(path)
    epoch = first.spool.epoch
    assert len(epoch) == 32 and Spool(path).epoch == epoch  # made with the spool, kept in it
    for _ in range(3):
        record(first, 10)
        first.flush()
        assert upload(first.spool, registry) == [True]
    first.close()
    remove_spool(path)  # the device is re-initialised: a new spool, seq from 1 again
    again = recorder(path)
    assert again.spool.epoch != epoch
    for _ in range(3):
        record(again, 10)
        again.flush()
        assert upload(again.spool, registry) == [True]
    again.close()
    stored = registry.telemetry("dev")
    assert sorted((t["epoch"], t["seq"]) for t in stored) == sorted((e, s) for e in (epoch, again.spool.epoch)
                                                                    for s in (1, 2, 3))  # fmt: skip
    assert sum(w["count"] for t in stored for w in t["windows"]) == 60  # no call lost


def test_a_registry_file_from_before_epochs_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    with sqlite3.connect(path) as db:
        db.execute(OLD_TELEMETRY_TABLE)
        rows = [(seq, float(seq), json.dumps([WINDOW])) for seq in (1, 2)]
        db.executemany("INSERT INTO telemetry VALUES ('dev', ?, ?, 3, ?, '[]')", rows)
    registry = SQLiteRegistry(str(path))
    SQLiteRegistry(str(path))  # opened again: nothing to migrate twice
    assert [(t["epoch"], t["seq"], t["dropped"], t["windows"][0]["count"]) for t in registry.telemetry()] == [
        ("", 1, 3, 4),
        ("", 2, 3, 4),
    ]
    old_agent_resend = TelemetryBatch("dev", 2, (TelemetryWindow(**{**WINDOW, "latency_hist": (4,)}),))
    assert not registry.add_telemetry(old_agent_resend)  # an old agent's resent batch is still a duplicate
    assert registry.add_telemetry(TelemetryBatch("dev", 1, epoch="e1"))
    with sqlite3.connect(path) as db:
        key = [row[1] for row in db.execute("PRAGMA table_info(telemetry)") if row[5]]
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE name LIKE 'telemetry%'")]
    assert key == ["device_id", "epoch", "seq"] and tables == ["telemetry"]


def test_a_spool_from_before_epochs_gets_one_and_sends_its_old_batch_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.db"
    old_batch = {"device_id": "dev", "seq": 4, "windows": [WINDOW], "dropped": 0, "histograms": []}
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)  # the spool before this change: no epoch, no call counts
        db.execute("INSERT INTO outbox VALUES (4, ?)", (json.dumps(old_batch),))
        db.execute("INSERT INTO counters VALUES ('seq', 4)")
    spool = Spool(path)
    assert len(spool.epoch) == 32 and Spool(path).epoch == spool.epoch
    resent = spool.next_batch("dev")
    assert resent is not None and (resent.seq, resent.epoch) == (4, "")  # as the hub stored it, if it did
    spool.acknowledge(4)
    spool.append([], dropped=2)
    later = spool.next_batch("dev")
    assert later is not None and (later.seq, later.epoch, later.dropped) == (5, spool.epoch, 2)


def stream(rec: TelemetryRecorder, calls: int, damage: Any) -> int:
    """Record ``calls`` calls from another thread while the writer flushes every few ms; ``damage`` the
    spool half way. The calls recorded."""
    done = threading.Event()

    def app() -> None:
        for i in range(calls):
            rec.record("m", "1", "local", 1.0, True)
            if i % 100 == 99:
                time.sleep(0.002)
        done.set()

    thread = threading.Thread(target=app)
    thread.start()
    time.sleep(0.05)
    damage()
    done.wait(30)
    thread.join()
    return calls


def test_deleting_the_spool_under_a_running_recorder_loses_no_call_uncounted(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.db"
    rec = recorder(path, flush_interval_s=0.005)
    epoch = rec.spool.epoch
    recorded = stream(rec, 8000, lambda: remove_spool(path))
    time.sleep(0.05)
    assert rec._thread.is_alive()
    record(rec, 10)  # calls after the loss are spooled
    rec.close()
    spool = Spool(path)  # as the agent opens it
    counters = spool.counters()
    assert spool.epoch != epoch and counters["spool_resets"] == 1
    assert counters["dropped"] > 0 and spool.pending_calls() >= 10
    assert spool.pending_calls() + counters["dropped"] == recorded + 10  # every call spooled or counted
    batch = spool.next_batch("dev")
    assert batch is not None and batch.epoch == spool.epoch and batch.seq == 1
    assert batch.dropped == counters["dropped"] and batch.windows[0].count == counters["spooled"]


def test_a_spool_deleted_between_flushes_counts_what_it_held(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.db"
    rec, reader = recorder(path), Spool(path)
    record(rec, 5)
    rec.flush()
    remove_spool(path)
    assert reader.pending_calls() == 0  # the agent notices first: a new spool, the count not known to it
    record(rec, 7)
    rec.flush()  # the writer notices: its connection still reads the deleted file, 5 calls unsent
    rec.close()
    counters = reader.counters()
    assert (reader.pending_calls(), counters["dropped"], counters["spool_resets"]) == (7, 5, 1)
    batch = reader.next_batch("dev")
    assert batch is not None and (batch.dropped, batch.windows[0].count) == (5, 7)


def test_a_corrupted_spool_is_set_aside_and_made_again(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.db"
    rec = recorder(path)
    epoch = rec.spool.epoch
    record(rec, 5)
    rec.flush()
    with open(path, "r+b") as file:  # garbage over the running spool
        file.write(np.random.default_rng(1).bytes(8192))
    record(rec, 7)
    rec.flush()
    record(rec, 3)
    rec.flush()
    assert rec._thread.is_alive()
    rec.close()
    spool = Spool(path)
    assert spool.epoch != epoch and spool.pending_calls() == 10  # every call after the damage spooled
    assert spool.counter("spool_resets") == 1 and spool.counter("dropped") in (0, 5)  # 5 if still readable
    assert len(list(tmp_path.glob("telemetry.db.corrupt-*"))) == 1


def test_a_corrupted_spool_at_rest_opens(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.db"
    Spool(path).append([], dropped=1)
    path.write_bytes(b"garbage " * 1000)
    rec = recorder(path)  # the app starts (it used to fail here)
    record(rec, 4)
    rec.close()
    assert rec.spool.pending_calls() == 4 and rec.spool.counter("spool_resets") == 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"windows": [{**WINDOW, "latency_ms_sum": float("nan")}]}, "windows[0].latency_ms_sum"),
        ({"windows": [WINDOW, {**WINDOW, "start": float("inf")}]}, "windows[1].start"),
        ({"windows": [{**WINDOW, "end": float("-inf")}]}, "windows[0].end"),
        ({"windows": [{**WINDOW, "count": -1}]}, "windows[0].count"),
        ({"windows": [{**WINDOW, "latency_hist": [1, -3]}]}, "windows[0].latency_hist[1]"),
        ({"dropped": -5}, "TelemetryBatch.dropped"),
        ({"windows": [{**WINDOW, "count": 2**64}]}, "windows[0].count"),  # would overflow the hub's sums
        ({"windows": [{**WINDOW, "errors": WINDOW["count"] + 1}]}, "errors and budget_breaches cannot exceed"),
        ({"windows": [{**WINDOW, "latency_hist": [2**60]}]}, "windows[0].latency_hist[0]"),
        ({"histograms": [{"model": "m", "version": "1", "tensor": "x", "edges": [0.0, float("nan")], "counts": [1]}]},
         "histograms[0].edges[1]"),
        ({"histograms": [{"model": "m", "version": "1", "tensor": "x", "edges": [0.0, 1.0], "counts": [-1]}]},
         "histograms[0].counts[0]"),
        ({"histograms": [{"model": "m", "version": "1", "tensor": "x", "edges": [0.0, 1.0], "counts": [1],
                          "calls": -2}]}, "histograms[0].calls"),
    ],
)  # fmt: skip
def test_non_finite_numbers_and_negative_counts_are_refused(change: dict[str, Any], field: str) -> None:
    payload = json.dumps({"device_id": "dev", "seq": 1, "windows": [WINDOW], **change}).encode()  # NaN, Infinity
    with pytest.raises(MessageError, match=field.replace("[", r"\[").replace("]", r"\]")):
        from_wire(TelemetryBatch, payload)


def test_the_spool_never_sends_what_the_hub_refuses(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "telemetry.db")
    bad = {"device_id": "dev", "seq": 1, "windows": [{**WINDOW, "latency_ms_sum": float("nan")}], "dropped": 2}
    with sqlite3.connect(tmp_path / "telemetry.db") as db:  # left in the outbox by an older version
        db.execute("INSERT INTO outbox VALUES (1, ?)", (json.dumps(bad),))
        db.execute("INSERT INTO counters VALUES ('seq', 1), ('dropped', 2), ('dropped_reported', 2)")
    rec = TelemetryRecorder(spool, flush_interval_s=3600.0)
    for latency in (float("nan"), float("inf"), -1.0, 2.0):
        rec.record("m", "1", "local", latency, True)
    rec.close()
    batch = spool.next_batch("dev")
    assert batch is not None and batch.seq == 2
    assert batch.dropped == 4 + 2  # the refused batch's calls and the drops it carried
    (window,) = batch.windows
    assert window.count == 4 and 2.0 < window.latency_ms_sum < 2e9 and window.latency_hist[-1] == 1
    assert from_wire(TelemetryBatch, to_wire(batch)) == batch


def test_cloud_hub_telemetry_shows_dropped_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    batches = [
        {"device_id": "dev", "epoch": "abcdef0123456789", "seq": 1, "dropped": 7,
         "windows": [WINDOW, {**WINDOW, "route": "cloud"}]},
        {"device_id": "dev", "epoch": "abcdef0123456789", "seq": 2, "dropped": 3, "windows": []},
    ]  # fmt: skip

    class Hub:
        def request(self, method: str, path: str) -> Any:
            return batches

    monkeypatch.setattr(fleet, "client", lambda *args: Hub())
    result = CliRunner().invoke(hub_cli, ["telemetry", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [(r["seq"], r.get("route"), r["dropped"]) for r in rows] == [(1, "local", 7), (1, "cloud", 0), (2, None, 3)]
    assert all(isinstance(r["dropped"], int) for r in rows) and rows[0]["epoch"] == "abcdef01"
    table = CliRunner().invoke(hub_cli, ["telemetry"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "dropped" in table.output


def test_old_agents_batches_decode_with_no_epoch() -> None:
    batch = from_wire(TelemetryBatch, json.dumps({"device_id": "dev", "seq": 3, "windows": [WINDOW]}).encode())
    assert batch.epoch == "" and batch.windows[0].count == 4


def test_an_acknowledgement_for_another_spool_is_ignored(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "telemetry.db")
    spool.append([], dropped=1)
    batch = spool.next_batch("dev")
    assert batch is not None
    spool.acknowledge(batch.seq, epoch="an old spool's")
    assert spool.next_batch("dev") == batch  # still waiting for its own acknowledgement
    spool.acknowledge(batch.seq, epoch=batch.epoch)
    assert spool.next_batch("dev") is None
