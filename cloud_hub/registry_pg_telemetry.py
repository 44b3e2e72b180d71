"""The PostgreSQL registry's telemetry: batches stored once per (device, epoch, seq), read in arrival order.

``PostgresTelemetry`` is a mixin of ``PostgresRegistry`` (``registry_pg.py``), which owns the pool.
Exactly-once is the database's: the UNIQUE constraint ``telemetry_once`` and ``ON CONFLICT DO NOTHING``,
so hub replicas that receive the same batch store it once. ``telemetry_after`` reads by the identity
column ``cursor``; each insert holds a transaction-scoped advisory lock from taking its ``cursor`` to its
commit, so cursors become visible in increasing order and a reader never steps past one committed later.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, LiteralString

from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from edge_agent.protocol.messages import TelemetryBatch

INSERT_LOCK_KEY = 0x6564_6765_7465_6C  # pg_advisory_xact_lock key: telemetry inserts, one at a time
_COLUMNS = "device_id, epoch, seq, received, dropped, windows, histograms"


class PostgresTelemetry:
    """Telemetry methods of ``PostgresRegistry``, on its ``_pool``."""

    _pool: ConnectionPool

    def _rows(self, query: LiteralString | sql.Composed, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        raise NotImplementedError  # PostgresRegistry's

    def add_telemetry(self, batch: TelemetryBatch) -> bool:
        with self._pool.connection() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [INSERT_LOCK_KEY])
            inserted = conn.execute(
                f"INSERT INTO telemetry ({_COLUMNS}) VALUES (%s, %s, %s, EXTRACT(EPOCH FROM clock_timestamp()), %s, "
                "%s, %s) ON CONFLICT ON CONSTRAINT telemetry_once DO NOTHING",
                [batch.device_id, batch.epoch, batch.seq, batch.dropped, Jsonb([w.__dict__ for w in batch.windows]),
                 Jsonb([h.__dict__ for h in batch.histograms])],
            ).rowcount  # fmt: skip
        return inserted == 1

    def telemetry(self, device_id: str | None = None) -> list[dict[str, Any]]:
        return self._rows(
            f"SELECT {_COLUMNS} FROM telemetry WHERE (%s::text IS NULL OR device_id = %s) "
            "ORDER BY device_id, received, seq",
            [device_id, device_id],
        )

    def telemetry_after(self, cursor: int, limit: int = 500) -> list[dict[str, Any]]:
        return self._rows(
            f"SELECT cursor, {_COLUMNS} FROM telemetry WHERE cursor > %s ORDER BY cursor LIMIT %s", [cursor, limit]
        )
