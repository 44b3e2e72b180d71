"""The telemetry spool: SQLite (WAL) shared by the app processes (writers) and the agent (reader, uploader).

Each write stores the calls of one (model, version, route) as one row of packed arrays (timestamp f8,
latency f4, flags u1: 13 bytes a call; flags bit 0 = success, bit 1 = over the latency budget), merges
tensor histogram counts per (model, version, tensor) with how many calls they summarise, and bumps the
counters (``dropped``, ``budget_breaches``, ``spooled``). The agent aggregates the packed calls into
windows and moves them into an outbox in one transaction; an outbox entry is deleted only when the hub
acknowledges its sequence number, so a crash loses nothing and a resent batch is deduplicated by the
hub on (device, epoch, seq). A spool file written by an older version is migrated in place when opened.

The spool's ``epoch`` is a random id made with it (and given to an older file when it is opened) and
sent in every batch: a spool made again starts ``seq`` at 1 under a new epoch, which the hub keeps apart.

**Cap and full policy.** At most ``max_calls`` calls wait in the ``calls`` table (the batch in flight, in
the outbox, is no longer counted there); past that, ``drop_oldest`` deletes the oldest rows (one write of
one app each) and ``reject_new`` refuses the newest calls of the write; either way the
calls lost are counted in ``dropped`` and reported to the hub, so generated = delivered + dropped. Both
come from ``agent.json`` (``spool_max_calls``, ``spool_full``) in the spool's directory unless given.

**Durability.** WAL with ``synchronous=NORMAL`` (docs/sdk.md, Telemetry): a commit is in the OS's cache
when it returns, so a process crash (even SIGKILL) loses nothing committed; the WAL is fsynced only at
checkpoints, so a power cut or an OS crash can roll back the commits since the last one (the file stays
consistent).

A spool file deleted or corrupted under running processes is made again (a corrupted one is set aside
as ``telemetry.db.corrupt-TIME``); what the old one still held unsent is counted as ``dropped`` (once,
however many processes notice) and ``spool_resets`` counts the re-creations.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edge_agent.calls import CallBlock, TensorCounts, aggregate
from edge_agent.config import AgentConfig
from edge_agent.errors import ConfigError
from edge_agent.protocol.errors import MessageError
from edge_agent.protocol.messages import TelemetryBatch, TensorHistogram, from_wire
from edge_agent.spool_schema import (
    DEFAULT_MAX_CALLS,
    DROP_OLDEST,
    FULL_POLICIES,
    REJECT_NEW,
    SCHEMA,
    Identity,
    admit,
    bump,
    counter_in,
    epoch_in,
    file_identity,
    inspect_file,
    is_corrupt,
    merge_histogram,
    migrate,
)

log = logging.getLogger(__name__)

SPOOL_FILE = "telemetry.db"
MAX_SPOOL_CALLS = DEFAULT_MAX_CALLS


class Spool:
    """SQLite spool shared by the app processes (writers) and the agent (reader and uploader).

    ``append`` keeps one connection open (a writer thread appends a few times a second; opening and
    closing a WAL database each time cost a connect and a checkpoint); the other methods open their own.
    ``max_calls`` and ``full_policy`` (``drop_oldest`` or ``reject_new``) default to ``agent.json``'s
    ``spool_max_calls`` and ``spool_full`` in the spool's directory, else 1,000,000 and ``drop_oldest``.
    """

    def __init__(self, path: Path, max_calls: int | None = None, full_policy: str | None = None) -> None:
        configured_cap, configured_policy = _configured(path.parent)
        self.path = path
        self.max_calls = configured_cap if max_calls is None else max_calls
        self.full_policy = configured_policy if full_policy is None else full_policy
        if self.max_calls < 1 or self.full_policy not in FULL_POLICIES:
            raise ValueError(f"spool cap {self.max_calls} / policy {self.full_policy!r}: a cap >= 1 and one of "
                             f"{', '.join(FULL_POLICIES)}")  # fmt: skip
        self.epoch = ""
        self._identity: Identity = None
        self._write_db: sqlite3.Connection | None = None
        self._write_lock = threading.RLock()
        self._initialise()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            db.close()
            raise
        return db

    def _initialise(self) -> None:
        """Open (or make) the spool file, bring its schema up to date and read its epoch; a file that is
        not a database is set aside and made again."""
        try:
            self._create()
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc):
                raise
            aside = self._set_aside(file_identity(self.path))
            self._create()
            if aside:
                self._record_gap(aside, 0)

    def _create(self) -> None:
        if not self.path.exists():  # a -wal or -shm left by a deleted spool must not be replayed into the new one
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        db = self._open()
        try:
            db.executescript(SCHEMA)
            self.epoch = migrate(db)
            self._identity = file_identity(self.path)
        finally:
            db.close()

    def _set_aside(self, corrupt: Identity) -> str:
        """Move a corrupted spool file (and its -wal, -shm) aside, unless another process already did; where
        to ("" when not moved)."""
        if corrupt is None or file_identity(self.path) != corrupt:
            return ""
        aside = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        for suffix in ("", "-wal", "-shm"):
            with suppress(FileNotFoundError):
                os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
        log.warning("telemetry spool %s is corrupted: set aside as %s, a new one made", self.path, aside)
        return aside

    def _check_file(self) -> None:
        """Make the spool again when its file was deleted or replaced since this process opened it, or
        no longer starts with SQLite's header (overwritten: a connection reading the WAL would not see it)."""
        identity, intact = inspect_file(self.path)
        if identity == self._identity and intact:
            return
        with self._write_lock:
            identity, intact = inspect_file(self.path)
            if identity != self._identity or not intact:
                self._reset(corrupt=None if intact else identity)

    def _reset(self, corrupt: Identity) -> None:
        """Drop the write connection, make the spool again and record the gap: what the old file still
        held unsent (readable while the write connection keeps a deleted file open) counts as dropped."""
        old_epoch, lost = self.epoch, 0
        if self._write_db is not None:
            lost = _unsent(self._write_db)  # best effort: 0 when it cannot be read
            self._write_db.close()
            self._write_db = None
        self._set_aside(corrupt)
        self._initialise()
        if self.epoch != old_epoch:
            self._record_gap(old_epoch, lost)

    def _record_gap(self, old_epoch: str, lost: int) -> None:
        """Count ``lost`` calls of the spool ``old_epoch`` (or set-aside file) as dropped, once."""
        db = self._open()
        try:
            db.execute("BEGIN IMMEDIATE")
            # several processes may notice the same loss, not all able to count it: the largest count is kept
            row = db.execute("SELECT value FROM meta WHERE name = ?", (f"lost:{old_epoch}",)).fetchone()
            counted = -1 if row is None else int(row[0])
            if lost > counted:
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"lost:{old_epoch}", str(lost)))
                bump(db, "dropped", lost - max(counted, 0))
            bump(db, "spool_resets", int(row is None))
            db.execute("COMMIT")
        finally:
            db.close()
        if counted < 0:
            log.warning("telemetry spool %s was deleted or corrupted: made again (epoch %s); %d unsent calls of "
                        "the old one counted as dropped", self.path, self.epoch, lost)  # fmt: skip

    def _on_error(self, exc: BaseException, identity: Identity) -> None:
        if isinstance(exc, sqlite3.DatabaseError) and is_corrupt(exc):
            with self._write_lock:
                self._reset(corrupt=identity)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        self._check_file()
        identity = self._identity
        try:
            db = self._open()
            try:
                yield db
            finally:
                db.close()
        except sqlite3.DatabaseError as exc:
            self._on_error(exc, identity)
            raise

    @contextmanager
    def _writer(self) -> Iterator[sqlite3.Connection]:
        self._check_file()
        with self._write_lock:
            if self._write_db is None:
                self._write_db = self._open()
            try:
                yield self._write_db
            except BaseException:
                if self._write_db is not None and self._write_db.in_transaction:
                    self._write_db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        """Close the connection ``append`` keeps (the spool stays usable: the next append reopens it)."""
        with self._write_lock:
            if self._write_db is not None:
                self._write_db.close()
                self._write_db = None

    def append(self, blocks: list[CallBlock], dropped: int = 0, histograms: Iterable[TensorCounts] = ()) -> None:
        """Store packed calls and histogram counts in one transaction; past ``max_calls`` the oldest calls
        go (``drop_oldest``) or the newest are refused (``reject_new``), counted as dropped either way. A
        spool found corrupted is made again and the write retried there."""
        histograms = [h for h in histograms if np.isfinite(h.edges).all()]  # edges the hub would refuse
        identity = self._identity
        try:
            self._append(blocks, dropped, histograms)
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc):
                raise
            with self._write_lock:
                self._reset(corrupt=identity)
            self._append(blocks, dropped, histograms)

    def _append(self, blocks: list[CallBlock], dropped: int, histograms: list[TensorCounts]) -> None:
        with self._writer() as db:
            db.execute("BEGIN IMMEDIATE")
            if self.full_policy == REJECT_NEW:
                blocks, refused = admit(blocks, self.max_calls - counter_in(db, "spooled"))
                dropped += refused
            db.executemany(
                "INSERT INTO calls (model, version, route, n, ts, latency_ms, ok) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [b.row() for b in blocks],
            )
            for histogram in histograms:
                merge_histogram(db, histogram)
            bump(db, "spooled", sum(len(b.ts) for b in blocks))
            bump(db, "budget_breaches", sum(b.breaches for b in blocks))
            bump(db, "dropped", dropped + self._enforce_cap(db))
            db.execute("COMMIT")

    def _enforce_cap(self, db: sqlite3.Connection) -> int:
        """Delete the oldest rows (one write's calls each) while more than ``max_calls`` calls are
        spooled; the calls removed."""
        excess, removed = counter_in(db, "spooled") - self.max_calls, 0
        while removed < excess:
            rows = db.execute("SELECT id, n FROM calls ORDER BY id LIMIT 256").fetchall()
            if not rows:
                break
            for row_id, n in rows:
                if removed >= excess:
                    break
                db.execute("DELETE FROM calls WHERE id = ?", (row_id,))
                removed += int(n)
        bump(db, "spooled", -removed)
        return removed

    def counter(self, name: str) -> int:
        with self._connect() as db:
            return counter_in(db, name)

    def counters(self) -> dict[str, int]:
        """All counters: ``dropped`` (calls lost to a full queue or spool), ``budget_breaches`` (local
        calls over the latency budget, ever), ``spooled``, ``spool_resets`` (times the spool file was made again
        after it was deleted or corrupted) and the upload bookkeeping (``seq``, ...)."""
        with self._connect() as db:
            return {name: int(value) for name, value in db.execute("SELECT name, value FROM counters ORDER BY 1")}

    def unacknowledged(self) -> int:
        """Batches built and not yet acknowledged by the hub (sent, or waiting to be)."""
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def pending_calls(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT COALESCE(SUM(n), 0) FROM calls").fetchone()[0])

    def next_batch(self, device_id: str, limit_rows: int = 10_000) -> TelemetryBatch | None:
        """The oldest unacknowledged batch; aggregates new calls into one when the outbox is empty."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            batch = _first_valid(db)
            if batch is None:
                payload = self._build_batch(db, device_id, limit_rows)
                batch = None if payload is None else from_wire(TelemetryBatch, payload.encode())
            db.execute("COMMIT")
        return batch

    def _build_batch(self, db: sqlite3.Connection, device_id: str, limit_rows: int) -> str | None:
        rows = db.execute(
            "SELECT id, model, version, route, n, ts, latency_ms, ok FROM calls ORDER BY id LIMIT ?", (limit_rows,)
        ).fetchall()
        dropped = counter_in(db, "dropped") - counter_in(db, "dropped_reported")
        histograms = tuple(
            TensorHistogram(model, version, tensor, tuple(json.loads(edges)), tuple(json.loads(counts)), calls, done)
            for model, version, tensor, edges, counts, calls, done in db.execute(
                "SELECT model, version, tensor, edges, counts, calls, summarised FROM histograms"
                " WHERE summarised > 0 OR calls = 0 ORDER BY 1, 2, 3"  # calls but none summarised: nothing to send
            )
        )
        if not rows and not dropped and not histograms:
            return None
        bump(db, "seq", 1)
        seq = counter_in(db, "seq")
        windows = aggregate([CallBlock.from_row(r[1:]) for r in rows])
        epoch = epoch_in(db)  # this file's, even if another process made it again since this one looked
        payload = json.dumps(asdict(TelemetryBatch(device_id, seq, windows, dropped, histograms, epoch)))
        db.execute("INSERT INTO outbox VALUES (?, ?)", (seq, payload))
        if rows:
            db.execute("DELETE FROM calls WHERE id <= ?", (rows[-1][0],))
            bump(db, "spooled", -sum(int(r[4]) for r in rows))
        db.execute("DELETE FROM histograms WHERE summarised > 0 OR calls = 0")  # the rows sent
        bump(db, "dropped_reported", dropped)
        return payload

    def acknowledge(self, seq: int, epoch: str | None = None) -> bool:
        """The hub stored every batch up to ``seq``; whether that removed anything. Ignored: an
        acknowledgement naming another spool's ``epoch`` (this one was made again meanwhile), and one for a
        ``seq`` this spool never sent (above every batch it made: forged, it would drop unsent calls)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            removed = 0
            if epoch is not None and epoch != epoch_in(db):
                log.info("telemetry ack for epoch %s ignored: this spool's is %s", epoch, epoch_in(db))
            elif seq > counter_in(db, "seq"):
                log.warning("telemetry ack for seq %d ignored: this spool never sent it (its last is %d)", seq,
                            counter_in(db, "seq"))  # fmt: skip
            else:
                removed = db.execute("DELETE FROM outbox WHERE seq <= ?", (seq,)).rowcount
            db.execute("COMMIT")
        return removed > 0


def _configured(state_dir: Path) -> tuple[int, str]:
    """The cap and full policy ``agent.json`` beside the spool sets; the defaults when there is none (a
    broken one stops the agent and the SDK before they open the spool)."""
    try:
        config = AgentConfig.load(state_dir)
    except (ConfigError, OSError):  # none, or not readable by this process
        return DEFAULT_MAX_CALLS, DROP_OLDEST
    return config.spool_max_calls, config.spool_full


def _first_valid(db: sqlite3.Connection) -> TelemetryBatch | None:
    """The oldest outbox batch; one the hub would refuse (an older version's, with NaN in it) is removed
    and its calls counted as dropped, so it cannot hold up every later batch."""
    for seq, payload in db.execute("SELECT seq, payload FROM outbox ORDER BY seq").fetchall():
        try:
            return from_wire(TelemetryBatch, payload.encode())
        except MessageError as exc:
            log.warning("telemetry batch %d is malformed (%s): removed, its calls counted as dropped", seq, exc)
            db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            bump(db, "dropped", _payload_calls(payload))  # its calls, never sent
            bump(db, "dropped_reported", -_payload_dropped(payload))  # and the drops it was to report
    return None


def _payload_calls(payload: str) -> int:
    """Calls a batch payload's windows count (0 when unreadable)."""
    try:
        return sum(max(int(w.get("count", 0)), 0) for w in json.loads(payload).get("windows", ()))
    except (ValueError, TypeError, AttributeError, OverflowError):
        return 0


def _payload_dropped(payload: str) -> int:
    try:
        return max(int(json.loads(payload).get("dropped", 0)), 0)
    except (ValueError, TypeError, AttributeError, OverflowError):
        return 0


def _unsent(db: sqlite3.Connection) -> int:
    """Calls a spool holds that the hub has not acknowledged: spooled, dropped but not reported yet, and
    in the outbox (0 when it cannot be read)."""
    try:
        calls = int(db.execute("SELECT COALESCE(SUM(n), 0) FROM calls").fetchone()[0])
        outbox = sum(_payload_calls(p) + _payload_dropped(p) for (p,) in db.execute("SELECT payload FROM outbox"))
        return calls + outbox + counter_in(db, "dropped") - counter_in(db, "dropped_reported")
    except sqlite3.Error:
        return 0
