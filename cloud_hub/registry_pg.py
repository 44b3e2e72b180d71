"""The registry on PostgreSQL (psycopg 3): ``cloud-hub serve --registry postgresql://USER@HOST/DB``.

Same semantics as ``SQLiteRegistry`` (the contract in ``tests/registry_contract.py``); what differs is
that several hub replicas may share the database, so every rule lives in it, not in one process:
telemetry is stored once per (device, epoch, seq) by a UNIQUE constraint (``INSERT ... ON CONFLICT DO
NOTHING``), an enrollment token is spent by one ``UPDATE ... RETURNING``, and each multi-statement change
is one transaction. Connections come from a small ``psycopg_pool`` pool (thread-safe; a broken connection
is replaced). JSON columns are JSONB, except the signed manifest and its signature (TEXT, byte for byte).
The schema is created and upgraded by ``migrations.py`` on open. Telemetry methods: ``registry_pg_telemetry.py``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any, LiteralString

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from cloud_hub.errors import NotFound, RegistryError
from cloud_hub.migrations import migrate_postgres
from cloud_hub.registry import select_devices
from cloud_hub.registry_pg_telemetry import PostgresTelemetry
from cloud_hub.sqldb import PostgresDb, SqlDb
from edge_agent.protocol.manifest import Manifest

DEVICE_FIELDS = ("profile", "status", "reported", "last_seen", "groups", "tags", "enrolled")
_JSON_FIELDS = ("reported", "groups", "tags")
_ARTIFACT_COLUMNS = "artifact_id, name, version, release, profile, precision, size, created"


def describe(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise RegistryError(f"--registry {url.split('@')[-1]}: not a PostgreSQL URL ({exc})") from None
    host, port, db = info.get("host") or "localhost", info.get("port") or 5432, info.get("dbname") or ""
    return f"postgresql://{info.get('user', '') and str(info['user']) + '@'}{host}:{port}/{db}"


class PostgresRegistry(PostgresTelemetry):
    """Registry on a PostgreSQL database; the schema is migrated on open (under an advisory lock)."""

    def __init__(self, url: str, max_connections: int = 8, connect_timeout_s: float = 10.0) -> None:
        self.where = describe(url)
        try:
            with psycopg.connect(url, connect_timeout=int(connect_timeout_s)) as conn:
                self.schema_version = migrate_postgres(conn, self.where)
        except psycopg.OperationalError as exc:
            raise RegistryError(f"registry {self.where}: cannot connect ({' '.join(str(exc).split())}); check the "
                                "--registry URL and that the server runs and accepts this user") from None  # fmt: skip
        self._pool = ConnectionPool(url, min_size=1, max_size=max_connections, open=True, name="edgefed-registry",
                                    timeout=connect_timeout_s * 3)  # fmt: skip
        self._sql_db = PostgresDb(self._pool)

    def close(self) -> None:
        self._pool.close()

    def sql_db(self) -> SqlDb:
        return self._sql_db

    def _rows(self, query: LiteralString | sql.Composed, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cursor:
            cursor.execute(query, params)
            return cursor.fetchall()

    def _execute(self, query: LiteralString | sql.Composed, params: Sequence[Any] = ()) -> int:
        """Run one statement in its own transaction; the rows it changed."""
        with self._pool.connection() as conn:
            return conn.execute(query, params).rowcount

    def add_artifact(self, manifest: Manifest, signature: dict[str, Any]) -> bool:
        return self._execute(
            f"INSERT INTO artifacts ({_ARTIFACT_COLUMNS}, manifest, signature) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (artifact_id) DO NOTHING",
            [manifest.artifact_id, manifest.name, manifest.version, manifest.release, manifest.hardware.profile,
             manifest.precision, manifest.total_size, time.time(), json.dumps(manifest.to_wire()),
             json.dumps(signature)],
        ) == 1  # fmt: skip

    def artifacts(self, name: str | None = None, version: str | None = None) -> list[dict[str, Any]]:
        return self._rows(
            f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts WHERE (%s::text IS NULL OR name = %s) "
            "AND (%s::text IS NULL OR version = %s) ORDER BY release DESC",
            [name, name, version, version],
        )

    def artifact(self, artifact_id: str) -> dict[str, Any]:
        rows = self._rows("SELECT * FROM artifacts WHERE artifact_id = %s", [artifact_id])
        if not rows:
            raise NotFound(f"artifact {artifact_id} is not registered")
        return {**rows[0], "manifest": json.loads(rows[0]["manifest"]), "signature": json.loads(rows[0]["signature"])}

    def upsert_device(self, device_id: str, **fields: Any) -> None:
        with self._pool.connection() as conn:
            conn.execute("DELETE FROM removed_devices WHERE device_id = %s", [device_id])
            self._upsert_device(conn, device_id, fields)

    def update_from_device(self, device_id: str, **fields: Any) -> bool:
        with self._pool.connection() as conn:
            if conn.execute("SELECT 1 FROM removed_devices WHERE device_id = %s", [device_id]).fetchone():
                return False
            self._upsert_device(conn, device_id, fields)
            return True

    @staticmethod
    def _upsert_device(conn: psycopg.Connection[Any], device_id: str, fields: dict[str, Any]) -> None:
        unknown = set(fields) - set(DEVICE_FIELDS)
        if unknown:
            raise ValueError(f"unknown device fields {sorted(unknown)}; known: {', '.join(DEVICE_FIELDS)}")
        names = list(fields)
        values = [Jsonb(fields[n]) if n in _JSON_FIELDS else fields[n] for n in names]
        columns = sql.SQL(", ").join(sql.Identifier(n) for n in ["device_id", *names])
        placeholders = sql.SQL(", ").join(sql.Placeholder() for _ in range(len(names) + 1))
        update = sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(n)) for n in names)
        action = sql.SQL("DO UPDATE SET {}").format(update) if names else sql.SQL("DO NOTHING")
        conn.execute(sql.SQL("INSERT INTO devices ({}) VALUES ({}) ON CONFLICT (device_id) {}")
                     .format(columns, placeholders, action), [device_id, *values])  # fmt: skip

    def devices(self) -> list[dict[str, Any]]:
        return [self._device_row(r) for r in self._rows("SELECT * FROM devices ORDER BY device_id")]

    def device(self, device_id: str) -> dict[str, Any]:
        rows = self._rows("SELECT * FROM devices WHERE device_id = %s", [device_id])
        if not rows:
            raise NotFound(f"device {device_id!r} is unknown; list devices with 'cloud-hub devices list'")
        return self._device_row(rows[0])

    @staticmethod
    def _device_row(row: dict[str, Any]) -> dict[str, Any]:
        return {**row, "groups": row["groups"] or [], "tags": row["tags"] or {}}  # reported: NULL is None

    def remove_device(self, device_id: str) -> None:
        self.device(device_id)
        with self._pool.connection() as conn:
            for table in ("devices", "device_models", "device_tokens"):
                conn.execute(sql.SQL("DELETE FROM {} WHERE device_id = %s").format(sql.Identifier(table)), [device_id])
            conn.execute("INSERT INTO removed_devices VALUES (%s, %s) ON CONFLICT (device_id) "
                         "DO UPDATE SET removed = EXCLUDED.removed", [device_id, time.time()])  # fmt: skip

    def devices_matching(self, target: str) -> list[dict[str, Any]]:
        return select_devices(self, target)

    def add_enroll_token(self, token_sha256: str, expires: float, groups: list[str], tags: dict[str, str]) -> None:
        self._execute("INSERT INTO enroll_tokens (token_sha256, expires, groups, tags) VALUES (%s, %s, %s, %s)",
                      [token_sha256, expires, Jsonb(groups), Jsonb(tags)])  # fmt: skip

    def use_enroll_token(self, token_sha256: str, device_id: str) -> dict[str, Any] | None:
        now = time.time()
        rows = self._rows(
            "UPDATE enroll_tokens SET used = %s, device_id = %s "
            "WHERE token_sha256 = %s AND used IS NULL AND expires > %s RETURNING groups, tags",
            [now, device_id, token_sha256, now],
        )
        return {"groups": rows[0]["groups"], "tags": rows[0]["tags"]} if rows else None

    def create_deployment(self, name: str, version: str, target: str, assignments: dict[str, str]) -> str:
        deployment_id = uuid.uuid4().hex[:12]
        with self._pool.connection() as conn:
            conn.execute("INSERT INTO deployments VALUES (%s, %s, %s, %s, %s, %s)",
                         [deployment_id, name, version, target, time.time(), Jsonb(sorted(assignments))])  # fmt: skip
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO device_models VALUES (%s, %s, %s, %s, %s) ON CONFLICT (device_id, model) DO UPDATE "
                    "SET version = EXCLUDED.version, artifact_id = EXCLUDED.artifact_id, "
                    "deployment_id = EXCLUDED.deployment_id",
                    [(device, name, version, artifact, deployment_id) for device, artifact in assignments.items()],
                )
        return deployment_id

    def deployments(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM deployments ORDER BY created DESC")

    def desired(self, device_id: str) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM device_models WHERE device_id = %s ORDER BY model", [device_id])

    def audit(self, actor: str, action: str, detail: dict[str, Any]) -> None:
        self._execute("INSERT INTO audit (ts, actor, action, detail) VALUES (%s, %s, %s, %s)",
                      [time.time(), actor, action, Jsonb(detail)])  # fmt: skip

    def audit_log(self, since: float = 0.0, limit: int = 10_000) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT * FROM (SELECT id, ts, actor, action, detail FROM audit WHERE ts >= %s "
            "ORDER BY id DESC LIMIT %s) AS newest ORDER BY id",
            [since, limit],
        )

    def add_device_token(self, device_id: str, token_sha256: str) -> None:
        self._execute("INSERT INTO device_tokens VALUES (%s, %s, %s) ON CONFLICT (token_sha256) DO UPDATE "
                      "SET device_id = EXCLUDED.device_id, created = EXCLUDED.created",
                      [token_sha256, device_id, time.time()])  # fmt: skip

    def token_owner(self, token_sha256: str) -> str | None:
        rows = self._rows("SELECT device_id FROM device_tokens WHERE token_sha256 = %s", [token_sha256])
        return str(rows[0]["device_id"]) if rows else None

    def add_usage(self, counts: dict[tuple[str, str], int]) -> None:
        if not counts:
            return
        with self._pool.connection() as conn, conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO cloud_usage VALUES (%s, %s, %s) ON CONFLICT (device_id, model) "
                "DO UPDATE SET calls = cloud_usage.calls + EXCLUDED.calls",
                [(device, model, calls) for (device, model), calls in counts.items()],
            )

    def usage(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM cloud_usage ORDER BY device_id, model")

    def try_lead(self, name: str, holder: str, ttl_s: float) -> bool:
        # the database's clock, not the replicas': their clocks may disagree, the lease's must not
        return bool(self._rows(
            "INSERT INTO leases (name, holder, expires) VALUES (%s, %s, extract(epoch FROM clock_timestamp()) + %s) "
            "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires = excluded.expires "
            "WHERE leases.holder = excluded.holder OR leases.expires < extract(epoch FROM clock_timestamp()) "
            "RETURNING holder",
            [name, holder, ttl_s],
        ))  # fmt: skip

    def resign(self, name: str, holder: str) -> None:
        self._execute("DELETE FROM leases WHERE name = %s AND holder = %s", [name, holder])
