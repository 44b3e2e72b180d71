"""The SQLite registry's telemetry table: device telemetry batches, stored once per (device, epoch, seq)
(its primary key; the table is made by ``migrations.py``).

``TelemetryTables`` is a mixin of ``SQLiteRegistry`` (``registry.py``), which owns the database and the
lock; the ``Registry`` protocol there is the contract these methods fulfil.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from typing import Any

import sqlite_utils

from edge_agent.protocol.messages import TelemetryBatch

_TELEMETRY_COLUMNS = "device_id, epoch, seq, received, dropped, windows, histograms"


class TelemetryTables:
    """Telemetry methods of ``SQLiteRegistry``, on its ``db`` under its ``_lock``."""

    db: sqlite_utils.Database
    _lock: threading.RLock

    def add_telemetry(self, batch: TelemetryBatch) -> bool:
        row = {
            "device_id": batch.device_id,
            "epoch": batch.epoch,
            "seq": batch.seq,
            "received": time.time(),
            "dropped": batch.dropped,
            "windows": json.dumps([w.__dict__ for w in batch.windows]),
            "histograms": json.dumps([h.__dict__ for h in batch.histograms]),
        }
        with self._lock:
            try:
                self.db.table("telemetry").insert(row)
            except sqlite3.IntegrityError:
                return False
            return True

    def telemetry(self, device_id: str | None = None) -> list[dict[str, Any]]:
        where, args = ("device_id = ?", [device_id]) if device_id else (None, [])
        with self._lock:
            rows = self.db.table("telemetry").rows_where(where, args, order_by="device_id, received, seq")
            return [
                {**r, "windows": json.loads(r["windows"]), "histograms": json.loads(r["histograms"] or "[]")}
                for r in rows
            ]

    def telemetry_after(self, cursor: int, limit: int = 500) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.db.query(f"SELECT rowid AS cursor, {_TELEMETRY_COLUMNS} FROM telemetry WHERE rowid > ? "
                                 "ORDER BY rowid LIMIT ?", [cursor, limit])  # fmt: skip
            return [{**r, "windows": json.loads(r["windows"]), "histograms": json.loads(r["histograms"] or "[]")}
                    for r in rows]  # fmt: skip
