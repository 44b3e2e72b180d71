"""Telemetry on a real SQLite spool: budget breaches, sampled tensor summaries that scale back to the true
counts, a spool file from an older version, and drops that are always counted."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.protocol.sketch import Feature, Sketch
from edge_agent.telemetry import (
    ELIGIBLE,
    OVER_BUDGET,
    SAMPLED,
    CallBlock,
    Item,
    Spool,
    TelemetryRecorder,
    TensorCounts,
    pack,
)

EDGES = np.linspace(-3.0, 3.0, 13)
REFERENCE = Sketch([Feature(name, name, "pooled", 0, edges, np.zeros(len(edges) - 1, np.int64))
                    for name, edges in (("input", EDGES), ("output", np.linspace(0.0, 1.0, 5)))])  # fmt: skip
# the schema of the spool before histograms kept call counts (edgefed up to issue 10), verbatim
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (id INTEGER PRIMARY KEY, model TEXT, version TEXT, route TEXT, n INTEGER,
                                  ts BLOB, latency_ms BLOB, ok BLOB);
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, payload TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS histograms (model TEXT, version TEXT, tensor TEXT, edges TEXT, counts TEXT,
                                       PRIMARY KEY (model, version, tensor));
"""


def recorder(path: Path, **kwargs: float) -> TelemetryRecorder:
    """A recorder whose writer thread never flushes by itself (tests call ``flush``)."""
    return TelemetryRecorder(Spool(path), flush_interval_s=kwargs.pop("flush_interval_s", 3600.0), **kwargs)


def test_budget_breaches_are_counted_apart_from_errors(tmp_path: Path) -> None:
    rec = recorder(tmp_path / "t.db")
    for i in range(10):
        rec.record("m", "1", "local", 30.0 if i < 3 else 5.0, ok=i != 9, over_budget=i < 3)
    rec.record("m", "1", "cloud", 80.0, ok=False)
    rec.flush()
    spool = rec.spool
    assert spool.counters()["budget_breaches"] == 3
    batch = spool.next_batch("dev")
    assert batch is not None
    cloud, local = batch.windows  # sorted by route
    assert (local.route, local.count, local.errors, local.budget_breaches) == ("local", 10, 1, 3)
    assert (cloud.route, cloud.count, cloud.errors, cloud.budget_breaches) == ("cloud", 1, 1, 0)
    spool.acknowledge(batch.seq)
    rec.record("m", "1", "local", 40.0, ok=True, over_budget=True)
    rec.close()
    assert spool.counters()["budget_breaches"] == 4  # a running total, kept when batches go out
    later = spool.next_batch("dev")
    assert later is not None and later.windows[0].budget_breaches == 1 and later.windows[0].errors == 0


def test_flags_byte_keeps_the_calls_table_format(tmp_path: Path) -> None:
    rec = recorder(tmp_path / "t.db")
    rec.record("m", "1", "local", 9.0, ok=True, over_budget=True)
    rec.record("m", "1", "local", 1.0, ok=False)
    rec.close()
    with sqlite3.connect(tmp_path / "t.db") as db:
        (n, ok), *_ = db.execute("SELECT n, ok FROM calls").fetchall()
    assert n == 2 and list(ok) == [1 | OVER_BUDGET, 0]


def test_sampled_histograms_scale_back_to_the_true_counts(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    pool = [rng.normal(0.4, 1.0, (1, 64)).astype(np.float32) for _ in range(200)]
    rec = recorder(tmp_path / "t.db", flush_interval_s=0.05, summary_calls_per_s=100.0)
    calls, true_counts, lowest_rate = 0, np.zeros(len(EDGES) - 1, np.int64), 1.0
    for _ in range(40):  # ≈ 50,000 calls a second for half a second, against a budget of 100 a second
        for x in pool[:150]:
            rec.record("cnn", "1", "local", 0.1, True, REFERENCE, {"input": x}, {"output": np.full((1, 4), 0.3)})
            true_counts += REFERENCE.count({"input": x})["input"]
            calls += 1
        lowest_rate = min([lowest_rate, *rec.sample_rates.values()])
        time.sleep(0.012)
    rec.close()
    assert lowest_rate < 0.2  # sampling set in
    batch = rec.spool.next_batch("dev")
    assert batch is not None and batch.windows[0].count == calls
    histogram = next(h for h in batch.histograms if h.tensor == "input")
    assert histogram.calls == calls and 0 < histogram.summarised < calls / 5
    scaled = np.asarray(histogram.counts) * histogram.calls / histogram.summarised
    assert sum(histogram.counts) == 64 * histogram.summarised  # every value of every summarised call
    assert scaled.sum() == pytest.approx(true_counts.sum())
    assert np.abs(scaled / scaled.sum() - true_counts / true_counts.sum()).max() < 0.03
    output = next(h for h in batch.histograms if h.tensor == "output")
    assert output.calls == calls and output.summarised == histogram.summarised


def test_each_write_bins_a_bounded_number_of_calls() -> None:
    x, y = np.ones((1, 64), np.float32), np.zeros((1, 4), np.float32)
    summarised = 1 | ELIGIBLE | SAMPLED
    taken: list[Item] = [(("cnn", "1", "local"), 0.0, 1.0, summarised, REFERENCE, {"input": x, "output": y})] * 5000
    taken += [(("gemm", "1", "local"), 0.0, 1.0, 1 | OVER_BUDGET)] * 100
    taken += [(("cnn", "1", "local"), 0.0, 1.0, 1 | ELIGIBLE)] * 1000  # eligible, not sampled
    packed = pack(taken, max_summarised=50)
    assert sorted((b.model, len(b.ts), int(b.ok.max())) for b in packed.blocks) == [("cnn", 6000, 1), ("gemm", 100, 3)]
    assert {(h.tensor, h.calls, h.summarised, int(sum(h.counts))) for h in packed.histograms} == {
        ("input", 6000, 50, 50 * 64),
        ("output", 6000, 50, 50 * 4),
    }
    assert packed.eligible == {("cnn", "1", "local"): 6000}
    references = {("cnn", "1", "local"): REFERENCE}  # a later write in which no call was summarised
    later = pack([(("cnn", "1", "local"), 0.0, 1.0, 1 | ELIGIBLE)] * 10, 50, references)
    assert {(h.calls, h.summarised, int(sum(h.counts))) for h in later.histograms} == {(10, 0, 0)}


def test_a_spool_file_from_an_older_version_opens_and_works(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
        ts, latency = np.array([1.0, 2.0], "<f8"), np.array([3.0, 4.0], "<f4")
        db.execute("INSERT INTO calls (model, version, route, n, ts, latency_ms, ok) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   ("cnn", "1", "local", 2, ts.tobytes(), latency.tobytes(), bytes([1, 0])))  # fmt: skip
        db.execute("INSERT INTO counters VALUES ('dropped', 3)")
        db.execute("INSERT INTO histograms VALUES ('cnn', '1', 'input', ?, ?)",
                   ("[" + ", ".join(str(float(e)) for e in EDGES) + "]", str([10] * (len(EDGES) - 1))))  # fmt: skip
    Spool(path)  # a second opening migrates nothing twice
    rec = recorder(path)
    assert rec.spool.counters()["spooled"] == 2
    rec.record("cnn", "1", "local", 1.0, True, REFERENCE, {"input": np.zeros((1, 64), np.float32)}, {},
               over_budget=True)  # fmt: skip
    rec.close()
    batch = rec.spool.next_batch("dev")
    assert batch is not None and batch.dropped == 3
    window = batch.windows[0]
    assert (window.count, window.errors, window.budget_breaches) == (3, 1, 1)
    histogram = next(h for h in batch.histograms if h.tensor == "input")
    # the old row counted every call without keeping how many: it stays unscaled (calls = 0), new counts added
    assert (histogram.calls, histogram.summarised) == (0, 0)
    assert sum(histogram.counts) == 10 * (len(EDGES) - 1) + 64
    assert rec.spool.counters()["spooled"] == 0 == rec.spool.pending_calls()


def test_queue_overflow_is_counted_never_silent(tmp_path: Path) -> None:
    rec = recorder(tmp_path / "t.db")
    rec.queue_size = 1000

    def burst() -> None:
        for _ in range(5000):
            rec.record("m", "1", "local", 1.0, True)

    threads = [threading.Thread(target=burst) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rec.close()
    spool = rec.spool
    kept, dropped = spool.pending_calls(), spool.counter("dropped")
    assert dropped > 0 and kept + dropped == 20_000
    batch = spool.next_batch("dev")
    assert batch is not None and batch.dropped == dropped and batch.windows[0].count == kept


def test_a_failed_write_is_counted_as_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = recorder(tmp_path / "t.db")
    real_append, failures = rec.spool.append, [sqlite3.OperationalError("disk I/O error")]

    def flaky(*args: object, **kwargs: object) -> None:
        if failures:
            raise failures.pop()
        real_append(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(rec.spool, "append", flaky)
    for _ in range(7):
        rec.record("m", "1", "local", 1.0, True)
    rec.flush()  # fails: the 7 calls are lost, and counted
    rec.record("m", "1", "local", 1.0, True)
    rec.close()
    assert rec.spool.counter("dropped") == 7 and rec.spool.pending_calls() == 1


def test_a_full_spool_drops_the_oldest_calls_and_counts_them(tmp_path: Path) -> None:
    rec = TelemetryRecorder(Spool(tmp_path / "t.db", max_calls=25), flush_interval_s=3600.0)
    for _ in range(4):
        for _ in range(10):
            rec.record("m", "1", "local", 1.0, True)
        rec.flush()
    rec.close()
    counters = rec.spool.counters()
    assert counters["dropped"] == 20 and counters["spooled"] == rec.spool.pending_calls() == 20


def test_calls_with_no_summary_yet_count_but_are_not_sent_alone(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "t.db")
    edges, zeros, ones = EDGES, np.zeros(len(EDGES) - 1, np.int64), np.ones(len(EDGES) - 1, np.int64)
    spool.append([], histograms=[TensorCounts("cnn", "1", "input", edges, zeros, calls=40, summarised=0)])
    assert spool.next_batch("dev") is None  # nothing to scale yet
    spool.append([CallBlock("cnn", "1", "local", np.zeros(1), np.ones(1, np.float32), np.ones(1, np.uint8))])
    first = spool.next_batch("dev")
    assert first is not None and not first.histograms  # the 40 calls wait for a summary, they are not lost
    spool.acknowledge(first.seq)
    spool.append([], histograms=[TensorCounts("cnn", "1", "input", edges, ones, calls=60, summarised=2)])
    batch = spool.next_batch("dev")
    assert batch is not None
    (histogram,) = batch.histograms
    assert (histogram.calls, histogram.summarised, sum(histogram.counts)) == (100, 2, len(EDGES) - 1)


def test_a_variable_length_input_costs_no_call_of_any_model() -> None:
    """A sequence model's calls of other lengths than its reference's are left out of its counts (and of
    ``summarised``, so scaling stays unbiased); every call of every model is still written."""
    from edge_agent.protocol.sketch import build_reference

    rng = np.random.default_rng(1)
    sequence = Sketch.from_json(build_reference({"tokens": rng.standard_normal((200, 8))}, {}))
    assert sequence is not None
    summarised = 1 | ELIGIBLE | SAMPLED
    taken: list[Item] = [(("seq", "1", "local"), 0.0, 1.0, summarised, sequence,
                          {"tokens": rng.standard_normal((1, length))}) for length in (8, 5, 8, 12, 8)]  # fmt: skip
    taken += [(("cnn", "1", "local"), 0.0, 1.0, summarised, REFERENCE,
               {"input": np.ones((1, 4), np.float32)})] * 3  # fmt: skip
    packed = pack(taken, max_summarised=50)
    assert sorted((b.model, len(b.ts)) for b in packed.blocks) == [("cnn", 3), ("seq", 5)]
    tokens = [h for h in packed.histograms if h.tensor.startswith("tokens/")]
    assert len(tokens) == 8 and {(h.calls, h.summarised, int(sum(h.counts))) for h in tokens} == {(5, 3, 3)}
    assert {(h.tensor, h.summarised) for h in packed.histograms if h.model == "cnn"} == {("input", 3), ("output", 0)}
    for others in ([taken[1], taken[3]], [taken[1], taken[1]]):  # call by call, or one batch: none fits
        packed = pack(others, max_summarised=50)
        assert {(h.calls, h.summarised, int(sum(h.counts))) for h in packed.histograms} == {(2, 0, 0)}

    class Broken(Sketch):
        def count(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # type: ignore[override]
            raise RuntimeError("a tensor this version cannot bin")

    broken = Broken(list(sequence.features))
    packed = pack([(*item[:4], broken, item[5]) if item[0][0] == "seq" else item for item in taken], 50)  # type: ignore[misc]
    assert sorted((b.model, len(b.ts)) for b in packed.blocks) == [("cnn", 3), ("seq", 5)]
    assert {h.summarised for h in packed.histograms if h.model == "seq"} == {0}
