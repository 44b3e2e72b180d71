"""The telemetry spool: every SDK call leaves a record in SQLite (WAL) without blocking the caller.

Apps enqueue records on a bounded in-memory queue that a writer thread drains in batches; a full queue
or a full spool drops records, and every drop is counted and reported to the hub. The agent turns
records into aggregated windows and moves them into an outbox in one transaction; an outbox entry is
deleted only when the hub acknowledges its sequence number, so a crash loses nothing and a resent
batch is deduplicated by the hub on (device, seq).
"""

from __future__ import annotations

import bisect
import json
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.protocol.messages import LATENCY_EDGES_MS, TelemetryBatch, TelemetryWindow, TensorHistogram, from_wire
from edge_agent.reference import ReferenceBins, bin_counts

SPOOL_FILE = "telemetry.db"
MAX_SPOOL_ROWS = 200_000
QUEUE_SIZE = 10_000
MAX_SUMMARY_BYTES = 64 * 1024  # larger inputs are not copied for summaries; outputs always are summarised
_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (id INTEGER PRIMARY KEY, ts REAL, model TEXT, version TEXT, route TEXT,
                                  latency_ms REAL, ok INTEGER);
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, payload TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS histograms (model TEXT, version TEXT, tensor TEXT, edges TEXT, counts TEXT,
                                       PRIMARY KEY (model, version, tensor));
"""


@dataclass(frozen=True)
class CallRecord:
    ts: float
    model: str
    version: str
    route: str
    latency_ms: float
    ok: bool


class Spool:
    """SQLite spool shared by the app processes (writers) and the agent (reader and uploader)."""

    def __init__(self, path: Path, max_rows: int = MAX_SPOOL_ROWS) -> None:
        self.path, self.max_rows = path, max_rows
        with self._connect() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            yield db
        finally:
            db.close()

    @staticmethod
    def _bump(db: sqlite3.Connection, name: str, by: int) -> None:
        db.execute(
            "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )

    def append(self, records: list[CallRecord], dropped: int = 0, histograms: Histograms | None = None) -> None:
        """Store records and histogram counts; beyond ``max_rows`` the oldest records are dropped and counted."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            for (model, version, tensor), (edges, counts) in histograms.counts.items() if histograms else ():
                self._merge_histogram(db, model, version, tensor, edges, counts)
            db.executemany(
                "INSERT INTO calls (ts, model, version, route, latency_ms, ok) VALUES (?, ?, ?, ?, ?, ?)",
                [(r.ts, r.model, r.version, r.route, r.latency_ms, int(r.ok)) for r in records],
            )
            (count,) = db.execute("SELECT COUNT(*) FROM calls").fetchone()
            overflow = max(0, count - self.max_rows)
            if overflow:
                db.execute("DELETE FROM calls WHERE id IN (SELECT id FROM calls ORDER BY id LIMIT ?)", (overflow,))
            if overflow + dropped:
                self._bump(db, "dropped", overflow + dropped)
            db.execute("COMMIT")

    @staticmethod
    def _merge_histogram(db: sqlite3.Connection, model: str, version: str, tensor: str, edges: np.ndarray,
                         counts: np.ndarray) -> None:  # fmt: skip
        row = db.execute("SELECT edges, counts FROM histograms WHERE model = ? AND version = ? AND tensor = ?",
                         (model, version, tensor)).fetchone()  # fmt: skip
        total = [int(c) for c in counts]
        if row is not None and len(json.loads(row[0])) == len(edges):
            total = [a + b for a, b in zip(json.loads(row[1]), total, strict=True)]
        db.execute("INSERT OR REPLACE INTO histograms VALUES (?, ?, ?, ?, ?)",
                   (model, version, tensor, json.dumps([float(e) for e in edges]), json.dumps(total)))  # fmt: skip

    def counter(self, name: str) -> int:
        with self._connect() as db:
            row = db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def pending_calls(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM calls").fetchone()[0])

    def next_batch(self, device_id: str, limit: int = 50_000) -> TelemetryBatch | None:
        """The oldest unacknowledged batch; aggregates new calls into one when the outbox is empty."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT payload FROM outbox ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                row = self._build_batch(db, device_id, limit)
            db.execute("COMMIT")
        if row is None:
            return None
        return from_wire(TelemetryBatch, row[0].encode())

    def _build_batch(self, db: sqlite3.Connection, device_id: str, limit: int) -> tuple[str] | None:
        rows = db.execute(
            "SELECT id, ts, model, version, route, latency_ms, ok FROM calls ORDER BY id LIMIT ?", (limit,)
        ).fetchall()
        dropped_row = db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        reported_row = db.execute("SELECT value FROM counters WHERE name = 'dropped_reported'").fetchone()
        new_drops = (dropped_row[0] if dropped_row else 0) - (reported_row[0] if reported_row else 0)
        histograms = tuple(
            TensorHistogram(model, version, tensor, tuple(json.loads(edges)), tuple(json.loads(counts)))
            for model, version, tensor, edges, counts in db.execute("SELECT * FROM histograms ORDER BY 1, 2, 3")
        )
        if not rows and not new_drops and not histograms:
            return None
        self._bump(db, "seq", 1)
        seq = db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()[0]
        batch = TelemetryBatch(device_id, seq, aggregate(rows), new_drops, histograms)
        db.execute("DELETE FROM histograms")
        payload = json.dumps(asdict(batch))
        db.execute("INSERT INTO outbox VALUES (?, ?)", (seq, payload))
        if rows:
            db.execute("DELETE FROM calls WHERE id <= ?", (rows[-1][0],))
        if new_drops:
            self._bump(db, "dropped_reported", new_drops)
        return (payload,)

    def acknowledge(self, seq: int) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM outbox WHERE seq <= ?", (seq,))


def aggregate(rows: list[tuple[int, float, str, str, str, float, int]]) -> tuple[TelemetryWindow, ...]:
    """One window per (model, version, route): counts, errors, latency sum and histogram."""
    groups: dict[tuple[str, str, str], list[tuple[float, float, int]]] = {}
    for _, ts, model, version, route, latency, ok in rows:
        groups.setdefault((model, version, route), []).append((ts, latency, ok))
    windows = []
    for (model, version, route), calls in sorted(groups.items()):
        hist = [0] * (len(LATENCY_EDGES_MS) + 1)
        for _, latency, _ in calls:
            hist[bisect.bisect_left(LATENCY_EDGES_MS, latency)] += 1
        windows.append(
            TelemetryWindow(
                model=model,
                version=version,
                route=route,
                start=min(c[0] for c in calls),
                end=max(c[0] for c in calls),
                count=len(calls),
                errors=sum(1 for c in calls if not c[2]),
                latency_ms_sum=round(sum(c[1] for c in calls), 6),
                latency_hist=tuple(hist),
            )
        )
    return tuple(windows)


class TelemetryRecorder:
    """Non-blocking front of the spool for app processes: ``record`` is one deque append.

    A writer thread drains the deque every ``flush_interval_s``, computes the input/output histograms on
    the model's reference bins off the caller's path, and writes everything to the spool in one
    transaction. Beyond ``QUEUE_SIZE`` pending records new ones are dropped and counted.
    """

    def __init__(self, spool: Spool, flush_interval_s: float = 0.05) -> None:
        self.spool, self.flush_interval_s = spool, flush_interval_s
        self._pending: deque[tuple[Any, ...]] = deque()
        self._overflow = 0
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="edgefed-telemetry", daemon=True)
        self._thread.start()

    def record(
        self, model: str, version: str, route: str, latency_ms: float, ok: bool,
        reference: ReferenceBins | None = None, inputs: dict[str, np.ndarray] | None = None,
        outputs: dict[str, np.ndarray] | None = None,
    ) -> None:  # fmt: skip
        if len(self._pending) >= QUEUE_SIZE:
            self._overflow += 1
            return
        if reference is not None and inputs is not None:
            inputs = {k: v.copy() for k, v in inputs.items() if v.nbytes <= MAX_SUMMARY_BYTES}
        self._pending.append((time.time(), model, version, route, latency_ms, ok, reference, inputs, outputs))

    def _drain(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            self.flush()
        self.flush()

    def flush(self) -> None:
        with self._flush_lock:
            while self._pending or self._overflow:
                records: list[CallRecord] = []
                histograms = Histograms()
                while self._pending and len(records) < 4096:
                    ts, model, version, route, latency, ok, reference, inputs, outputs = self._pending.popleft()
                    records.append(CallRecord(ts, model, version, route, latency, ok))
                    if reference is not None:
                        histograms.add(model, version, reference, inputs or {}, outputs or {})
                dropped, self._overflow = self._overflow, 0
                self.spool.append(records, dropped, histograms)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Histograms:
    """Counts per (model, version, tensor) on the reference bins, summed over a flush."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = {}

    def add(self, model: str, version: str, reference: ReferenceBins, *tensors: dict[str, np.ndarray]) -> None:
        for group in tensors:
            for name, values in group.items():
                edges = reference.edges.get(name)
                if edges is None or values.dtype.kind not in "biuf":
                    continue
                key = (model, version, name)
                counts = bin_counts(values, edges)
                if key in self.counts:
                    counts = counts + self.counts[key][1]
                self.counts[key] = (edges, counts)
