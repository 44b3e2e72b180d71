"""The telemetry spool: SQLite (WAL) shared by the app processes (writers) and the agent (reader, uploader).

Each write stores the calls of one (model, version, route) as one row of packed arrays (timestamp f8,
latency f4, flags u1: 13 bytes a call; flags bit 0 = success, bit 1 = over the latency budget), merges
tensor histogram counts per (model, version, tensor) with how many calls they summarise, and bumps the
counters (``dropped``, ``budget_breaches``, ``spooled``). The agent aggregates the packed calls into
windows and moves them into an outbox in one transaction; an outbox entry is deleted only when the hub
acknowledges its sequence number, so a crash loses nothing and a resent batch is deduplicated by the
hub on (device, seq). A spool file written by an older version is migrated in place when opened.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.protocol.messages import LATENCY_EDGES_MS, TelemetryBatch, TelemetryWindow, TensorHistogram, from_wire

SPOOL_FILE = "telemetry.db"
MAX_SPOOL_CALLS = 1_000_000
OK, OVER_BUDGET = 1, 2  # bits of a call's flags byte (the calls table's ``ok`` column)
_EDGES = np.asarray(LATENCY_EDGES_MS)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (id INTEGER PRIMARY KEY, model TEXT, version TEXT, route TEXT, n INTEGER,
                                  ts BLOB, latency_ms BLOB, ok BLOB);
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, payload TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS histograms (model TEXT, version TEXT, tensor TEXT, edges TEXT, counts TEXT,
                                       calls INTEGER NOT NULL DEFAULT 0, summarised INTEGER NOT NULL DEFAULT 0,
                                       PRIMARY KEY (model, version, tensor));
"""
# columns later versions added to tables an older spool file already has (calls = summarised = 0: every
# call was counted and the call count was not kept)
_ADDED_COLUMNS = {"histograms": ("calls INTEGER NOT NULL DEFAULT 0", "summarised INTEGER NOT NULL DEFAULT 0")}


@dataclass(frozen=True)
class CallBlock:
    """The calls of one (model, version, route), packed."""

    model: str
    version: str
    route: str
    ts: np.ndarray  # float64 Unix seconds
    latency_ms: np.ndarray  # float32
    ok: np.ndarray  # uint8 flags: OK | OVER_BUDGET

    def row(self) -> tuple[Any, ...]:
        return (self.model, self.version, self.route, len(self.ts), self.ts.astype("<f8").tobytes(),
                self.latency_ms.astype("<f4").tobytes(), self.ok.astype(np.uint8).tobytes())  # fmt: skip

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> CallBlock:
        model, version, route, _, ts, latency, ok = row
        return cls(model, version, route, np.frombuffer(ts, "<f8"), np.frombuffer(latency, "<f4"),
                   np.frombuffer(ok, np.uint8))  # fmt: skip

    @property
    def breaches(self) -> int:
        return int(np.count_nonzero(self.ok & OVER_BUDGET))


@dataclass(frozen=True)
class TensorCounts:
    """One tensor's histogram over the ``summarised`` of ``calls`` calls of a model version."""

    model: str
    version: str
    tensor: str
    edges: np.ndarray
    counts: np.ndarray
    calls: int
    summarised: int


class Spool:
    """SQLite spool shared by the app processes (writers) and the agent (reader and uploader).

    ``append`` keeps one connection open (a writer thread appends a few times a second; opening and
    closing a WAL database each time cost a connect and a checkpoint); the other methods open their own.
    """

    def __init__(self, path: Path, max_calls: int = MAX_SPOOL_CALLS) -> None:
        self.path, self.max_calls = path, max_calls
        self._write_db: sqlite3.Connection | None = None
        self._write_lock = threading.Lock()
        with self._connect() as db:
            db.executescript(_SCHEMA)
            _migrate(db)

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = self._open()
        try:
            yield db
        finally:
            db.close()

    @contextmanager
    def _writer(self) -> Iterator[sqlite3.Connection]:
        with self._write_lock:
            if self._write_db is None:
                self._write_db = self._open()
            try:
                yield self._write_db
            except BaseException:
                if self._write_db.in_transaction:
                    self._write_db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        """Close the connection ``append`` keeps (the spool stays usable: the next append reopens it)."""
        with self._write_lock:
            if self._write_db is not None:
                self._write_db.close()
                self._write_db = None

    def append(self, blocks: list[CallBlock], dropped: int = 0, histograms: Iterable[TensorCounts] = ()) -> None:
        """Store packed calls and histogram counts in one transaction; past ``max_calls`` the oldest rows
        go and are counted as dropped."""
        with self._writer() as db:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT INTO calls (model, version, route, n, ts, latency_ms, ok) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [b.row() for b in blocks],
            )
            for histogram in histograms:
                _merge_histogram(db, histogram)
            _bump(db, "spooled", sum(len(b.ts) for b in blocks))
            _bump(db, "budget_breaches", sum(b.breaches for b in blocks))
            _bump(db, "dropped", dropped + self._enforce_cap(db))
            db.execute("COMMIT")

    def _enforce_cap(self, db: sqlite3.Connection) -> int:
        """Delete the oldest rows while more than ``max_calls`` calls are spooled; the calls removed."""
        excess, removed = _counter_in(db, "spooled") - self.max_calls, 0
        while removed < excess:
            rows = db.execute("SELECT id, n FROM calls ORDER BY id LIMIT 256").fetchall()
            if not rows:
                break
            for row_id, n in rows:
                if removed >= excess:
                    break
                db.execute("DELETE FROM calls WHERE id = ?", (row_id,))
                removed += int(n)
        _bump(db, "spooled", -removed)
        return removed

    def counter(self, name: str) -> int:
        with self._connect() as db:
            return _counter_in(db, name)

    def counters(self) -> dict[str, int]:
        """All counters: ``dropped`` (calls lost to a full queue or spool), ``budget_breaches`` (local
        calls over the latency budget, ever), ``spooled``, and the upload bookkeeping (``seq``, ...)."""
        with self._connect() as db:
            return {name: int(value) for name, value in db.execute("SELECT name, value FROM counters ORDER BY 1")}

    def pending_calls(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT COALESCE(SUM(n), 0) FROM calls").fetchone()[0])

    def next_batch(self, device_id: str, limit_rows: int = 10_000) -> TelemetryBatch | None:
        """The oldest unacknowledged batch; aggregates new calls into one when the outbox is empty."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT payload FROM outbox ORDER BY seq LIMIT 1").fetchone()
            payload = row[0] if row else self._build_batch(db, device_id, limit_rows)
            db.execute("COMMIT")
        return None if payload is None else from_wire(TelemetryBatch, payload.encode())

    def _build_batch(self, db: sqlite3.Connection, device_id: str, limit_rows: int) -> str | None:
        rows = db.execute(
            "SELECT id, model, version, route, n, ts, latency_ms, ok FROM calls ORDER BY id LIMIT ?", (limit_rows,)
        ).fetchall()
        dropped = _counter_in(db, "dropped") - _counter_in(db, "dropped_reported")
        histograms = tuple(
            TensorHistogram(model, version, tensor, tuple(json.loads(edges)), tuple(json.loads(counts)), calls, done)
            for model, version, tensor, edges, counts, calls, done in db.execute(
                "SELECT model, version, tensor, edges, counts, calls, summarised FROM histograms"
                " WHERE summarised > 0 OR calls = 0 ORDER BY 1, 2, 3"  # calls but none summarised: nothing to send
            )
        )
        if not rows and not dropped and not histograms:
            return None
        _bump(db, "seq", 1)
        seq = _counter_in(db, "seq")
        windows = aggregate([CallBlock.from_row(r[1:]) for r in rows])
        payload = json.dumps(asdict(TelemetryBatch(device_id, seq, windows, dropped, histograms)))
        db.execute("INSERT INTO outbox VALUES (?, ?)", (seq, payload))
        if rows:
            db.execute("DELETE FROM calls WHERE id <= ?", (rows[-1][0],))
            _bump(db, "spooled", -sum(int(r[4]) for r in rows))
        db.execute("DELETE FROM histograms WHERE summarised > 0 OR calls = 0")  # the rows sent
        _bump(db, "dropped_reported", dropped)
        return payload

    def acknowledge(self, seq: int) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM outbox WHERE seq <= ?", (seq,))


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a spool file from an older version up to this schema (under the write lock: several
    processes may open it at once)."""
    db.execute("BEGIN IMMEDIATE")
    for table, columns in _ADDED_COLUMNS.items():
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for column in columns:
            if column.split()[0] not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
    db.execute("INSERT OR IGNORE INTO counters SELECT 'spooled', COALESCE(SUM(n), 0) FROM calls")
    db.execute("COMMIT")


def _bump(db: sqlite3.Connection, name: str, by: int) -> None:
    if by:
        db.execute(
            "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )


def _counter_in(db: sqlite3.Connection, name: str) -> int:
    row = db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
    return int(row[0]) if row else 0


def _merge_histogram(db: sqlite3.Connection, h: TensorCounts) -> None:
    """Add ``h`` to the spooled counts of its tensor. A row an older version wrote (calls = summarised = 0:
    every call counted, how many unknown) stays unscaled: ``h``'s counts are scaled to all its calls first."""
    row = db.execute(
        "SELECT edges, counts, calls, summarised FROM histograms WHERE model = ? AND version = ? AND tensor = ?",
        (h.model, h.version, h.tensor),
    ).fetchone()
    counts, calls, summarised = [int(c) for c in h.counts], h.calls, h.summarised
    if row is not None and len(json.loads(row[0])) == len(h.edges):
        if row[2] == 0 and row[3] == 0:
            counts, calls, summarised = [round(c * calls / max(summarised, 1)) for c in counts], 0, 0
        counts = [a + b for a, b in zip(json.loads(row[1]), counts, strict=True)]
        calls, summarised = calls + row[2], summarised + row[3]
    db.execute(
        "INSERT OR REPLACE INTO histograms VALUES (?, ?, ?, ?, ?, ?, ?)",
        (h.model, h.version, h.tensor, json.dumps([float(e) for e in h.edges]), json.dumps(counts), calls,
         summarised),
    )  # fmt: skip


def aggregate(blocks: list[CallBlock]) -> tuple[TelemetryWindow, ...]:
    """One window per (model, version, route): counts, errors (flag bit 0 clear), budget breaches (bit 1
    set), latency sum and histogram."""
    groups: dict[tuple[str, str, str], list[CallBlock]] = {}
    for block in blocks:
        groups.setdefault((block.model, block.version, block.route), []).append(block)
    windows = []
    for (model, version, route), parts in sorted(groups.items()):
        ts = np.concatenate([p.ts for p in parts])
        latency = np.concatenate([p.latency_ms for p in parts]).astype(np.float64)
        flags = np.concatenate([p.ok for p in parts])
        hist = np.bincount(np.searchsorted(_EDGES, latency, side="left"), minlength=len(_EDGES) + 1)
        windows.append(TelemetryWindow(
            model=model, version=version, route=route, start=float(ts.min()), end=float(ts.max()),
            count=len(ts), errors=int(np.count_nonzero((flags & OK) == 0)),
            latency_ms_sum=round(float(latency.sum()), 6), latency_hist=tuple(int(c) for c in hist),
            budget_breaches=int(np.count_nonzero(flags & OVER_BUDGET)),
        ))  # fmt: skip
    return tuple(windows)
