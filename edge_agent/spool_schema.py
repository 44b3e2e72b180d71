"""The spool file on disk: its schema and in-place migration from older versions, the SQL behind its
counters, calls and histogram rows (what a full spool admits), and how to tell that the file
was replaced or corrupted under a process."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import uuid
from pathlib import Path

from edge_agent.calls import CallBlock, TensorCounts

SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (id INTEGER PRIMARY KEY, model TEXT, version TEXT, route TEXT, n INTEGER,
                                  ts BLOB, latency_ms BLOB, ok BLOB);
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, payload TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS histograms (model TEXT, version TEXT, tensor TEXT, edges TEXT, counts TEXT,
                                       calls INTEGER NOT NULL DEFAULT 0, summarised INTEGER NOT NULL DEFAULT 0,
                                       PRIMARY KEY (model, version, tensor));
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
DEFAULT_MAX_CALLS = 1_000_000  # the spool's default cap, in calls waiting to be batched
DROP_OLDEST, REJECT_NEW = "drop_oldest", "reject_new"
FULL_POLICIES = (DROP_OLDEST, REJECT_NEW)  # what a full spool does; either way the calls lost count as dropped
CORRUPT_ERRORS = {"SQLITECORRUPT_ERRORS", "SQLITE_NOTADB"}
SQLITE_HEADER = b"SQLite format 3\x00"
Identity = tuple[int, int] | None  # the spool file's (device, inode); None: no file
# columns later versions added to tables an older spool file already has (calls = summarised = 0: every
# call was counted and the call count was not kept)
ADDED_COLUMNS = {"histograms": ("calls INTEGER NOT NULL DEFAULT 0", "summarised INTEGER NOT NULL DEFAULT 0")}


def file_identity(path: Path) -> Identity:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def inspect_file(path: Path) -> tuple[Identity, bool]:
    """The file's identity, and whether it starts with SQLite's header (an empty file may: it is new).

    Read through a descriptor kept open for the life of the process, never one opened and closed here:
    closing any descriptor of a file drops every POSIX lock the process holds on it, SQLite's included,
    and then another process's connection that closes believes it is the last one, checkpoints and
    deletes the WAL under this process's open connections — a corrupted spool (sqlite.org/howtocorrupt.html
    §2.2; seen with an app appending while the agent sent batches)."""
    try:
        fd = _header_fd(path)
        return _identity_of(fd), os.pread(fd, len(SQLITE_HEADER), 0) in (SQLITE_HEADER, b"")
    except FileNotFoundError:
        return None, True


_header_fds: dict[tuple[int, int], int] = {}  # (device, inode) → a read-only descriptor, never closed
_spare_fds: list[int] = []
_header_lock = threading.Lock()


def _identity_of(fd: int) -> tuple[int, int]:
    stat = os.fstat(fd)
    return stat.st_dev, stat.st_ino


def _header_fd(path: Path) -> int:
    """A descriptor of the file now at ``path``: one per file (inode) and process, opened once."""
    identity = file_identity(path)
    with _header_lock:
        if identity is not None and identity in _header_fds:
            return _header_fds[identity]
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # FileNotFoundError: gone meanwhile
        opened = _identity_of(fd)
        if opened in _header_fds:  # replaced between the stat and the open by a file already known:
            _spare_fds.append(fd)  # this one must stay open too (closing it would drop the locks)
            return _header_fds[opened]
        _header_fds[opened] = fd
        return fd


def is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    return (
        getattr(exc, "sqlite_errorname", "") in CORRUPT_ERRORS
        or "not a database" in str(exc)
        or "malformed" in str(exc)
    )


def migrate(db: sqlite3.Connection) -> str:
    """Bring a spool file from an older version up to this schema (under the write lock: several
    processes may open it at once); its epoch, made here for a new file or one from before epochs."""
    db.execute("BEGIN IMMEDIATE")
    for table, columns in ADDED_COLUMNS.items():
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for column in columns:
            if column.split()[0] not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
    db.execute("INSERT OR IGNORE INTO counters SELECT 'spooled', COALESCE(SUM(n), 0) FROM calls")
    db.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', ?)", (uuid.uuid4().hex,))
    epoch = epoch_in(db)
    db.execute("COMMIT")
    return epoch


def epoch_in(db: sqlite3.Connection) -> str:
    return str(db.execute("SELECT value FROM meta WHERE name = 'epoch'").fetchone()[0])


def bump(db: sqlite3.Connection, name: str, by: int) -> None:
    if by:
        db.execute(
            "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )


def counter_in(db: sqlite3.Connection, name: str) -> int:
    row = db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
    return int(row[0]) if row else 0


def admit(blocks: list[CallBlock], room: int) -> tuple[list[CallBlock], int]:
    """The first ``room`` calls of ``blocks`` (``reject_new``: the rest are refused) and how many were refused."""
    admitted, refused = [], 0
    for block in blocks:
        n = len(block.ts)
        take = min(n, max(room, 0))
        if take:
            admitted.append(block if take == n else _head(block, take))
        room -= take
        refused += n - take
    return admitted, refused


def _head(block: CallBlock, n: int) -> CallBlock:
    return CallBlock(block.model, block.version, block.route, block.ts[:n], block.latency_ms[:n], block.ok[:n])


def merge_histogram(db: sqlite3.Connection, h: TensorCounts) -> None:
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
