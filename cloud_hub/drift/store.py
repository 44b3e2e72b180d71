"""Where the drift job keeps its work, in the hub's registry database (``Registry.sql_db()``: SQLite's
registry.db or PostgreSQL): the telemetry cursor, each stream's
detector state and open window, and the closed windows (scores and counts) that reports and plots read.
A run of the job is saved in one transaction, so a crash repeats a run rather than losing half of one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from cloud_hub.sqldb import SqlDb, open_db

StreamKey = tuple[str, str, str]  # model, version, scope
_TABLES = (
    "CREATE TABLE IF NOT EXISTS drift_cursor (id INTEGER PRIMARY KEY CHECK (id = 1), cursor BIGINT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS drift_streams (
    model TEXT NOT NULL, version TEXT NOT NULL, scope TEXT NOT NULL,
    detector TEXT NOT NULL, pending TEXT NOT NULL, samples BIGINT NOT NULL, updated {real} NOT NULL,
    PRIMARY KEY (model, version, scope))""",
    """CREATE TABLE IF NOT EXISTS drift_windows (
    id {id},
    model TEXT NOT NULL, version TEXT NOT NULL, scope TEXT NOT NULL, at {real} NOT NULL,
    samples BIGINT NOT NULL, combined {real} NOT NULL, threshold {real} NOT NULL, alarm INTEGER NOT NULL,
    drifting TEXT NOT NULL, features TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS drift_windows_stream ON drift_windows (model, version, scope, at)",
)
_SQLITE = tuple(t.format(id="INTEGER PRIMARY KEY AUTOINCREMENT", real="REAL") for t in _TABLES)
_POSTGRES = tuple(t.format(id="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", real="DOUBLE PRECISION")
                  for t in _TABLES)  # fmt: skip
_SAVE_STREAM = (
    "INSERT INTO drift_streams VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (model, version, scope) DO UPDATE SET "
    "detector = excluded.detector, pending = excluded.pending, samples = excluded.samples, updated = excluded.updated"
)


@dataclass(frozen=True)
class SavedStream:
    key: StreamKey
    detector: dict[str, Any]
    pending: dict[str, list[int]]
    samples: int


@dataclass(frozen=True)
class ClosedWindow:
    key: StreamKey
    at: float
    samples: int
    combined: float
    threshold: float
    alarm: bool
    drifting: list[str]
    features: dict[str, dict[str, Any]]  # name → score (cusum / threshold), psi, js, p_value, counts


class DriftStore:
    def __init__(self, db: SqlDb | str, retention_windows: int = 10_000) -> None:
        """``db``: the registry's ``sql_db()``, or a SQLite file's path."""
        self.db, self._owned = open_db(db)
        self.db.ddl(sqlite=_SQLITE, postgresql=_POSTGRES)
        self.retention_windows = retention_windows

    def close(self) -> None:
        if self._owned:
            self.db.close()

    def cursor(self) -> int:
        rows = self.db.execute("SELECT cursor FROM drift_cursor WHERE id = 1")
        return int(rows[0]["cursor"]) if rows else 0

    def streams(self) -> list[SavedStream]:
        rows = self.db.execute("SELECT * FROM drift_streams")
        return [SavedStream((r["model"], r["version"], r["scope"]), json.loads(r["detector"]),
                            json.loads(r["pending"]), r["samples"]) for r in rows]  # fmt: skip

    def save(self, cursor: int, streams: list[SavedStream], windows: list[ClosedWindow]) -> None:
        """One run of the job: the new cursor, the streams it changed and the windows it closed."""
        now = time.time()
        with self.db.transaction() as db:
            db.execute("INSERT INTO drift_cursor (id, cursor) VALUES (1, ?) ON CONFLICT (id) "
                       "DO UPDATE SET cursor = excluded.cursor", [cursor])  # fmt: skip
            db.executemany(_SAVE_STREAM, [(*s.key, json.dumps(s.detector), json.dumps(s.pending), s.samples, now)
                                          for s in streams])  # fmt: skip
            rows = [(*w.key, w.at, w.samples, w.combined, w.threshold, int(w.alarm), json.dumps(w.drifting),
                     json.dumps(w.features)) for w in windows]  # fmt: skip
            db.executemany("INSERT INTO drift_windows (model, version, scope, at, samples, combined, threshold, alarm,"
                           " drifting, features) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)  # fmt: skip
            for key in {w.key for w in windows}:
                db.execute(
                    "DELETE FROM drift_windows WHERE model = ? AND version = ? AND scope = ? AND id <= "
                    "(SELECT id FROM drift_windows WHERE model = ? AND version = ? AND scope = ? "
                    "ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    [*key, *key, self.retention_windows],
                )

    def windows(self, model: str, version: str | None = None, scope: str = "all",
                since: float = 0.0) -> list[ClosedWindow]:  # fmt: skip
        """Closed windows of a model (one version, or all), oldest first."""
        query = "SELECT * FROM drift_windows WHERE model = ? AND scope = ? AND at >= ?"
        args: list[Any] = [model, scope, since]
        if version is not None:
            query, args = query + " AND version = ?", [*args, version]
        rows = self.db.execute(query + " ORDER BY id", args)
        return [ClosedWindow((r["model"], r["version"], r["scope"]), r["at"], r["samples"], r["combined"],
                             r["threshold"], bool(r["alarm"]), json.loads(r["drifting"]), json.loads(r["features"]))
                for r in rows]  # fmt: skip

    def versions(self, model: str) -> list[str]:
        """Versions of ``model`` with drift windows, the most recently scored first."""
        rows = self.db.execute(
            "SELECT version, MAX(at) AS last FROM drift_windows WHERE model = ? GROUP BY version ORDER BY last DESC",
            [model],
        )
        return [r["version"] for r in rows]
