"""The hub's registry: artifacts, devices, deployments, telemetry and the audit log.

``Registry`` is the storage contract, with two implementations that pass the same tests
(``tests/registry_contract.py``): ``SQLiteRegistry`` here (sqlite-utils, the default: ``STATE/registry.db``)
and ``PostgresRegistry`` (``registry_pg.py``, psycopg 3). ``open_registry`` picks one from a URL or path.
Both bring their schema up to date on open (``migrations.py``). All methods are thread-safe.
Timestamps are Unix seconds (float).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from typing import Any, Protocol

import sqlite_utils

from cloud_hub.errors import NotFound
from cloud_hub.migrations import migrate_sqlite
from cloud_hub.registry_telemetry import TelemetryTables
from cloud_hub.sqldb import SqlDb, SqliteDb
from edge_agent.protocol.manifest import Manifest
from edge_agent.protocol.messages import TelemetryBatch


class Registry(Protocol):
    def add_artifact(self, manifest: Manifest, signature: dict[str, Any]) -> bool:
        """Record an artifact (idempotent); True when it was new."""

    def artifacts(self, name: str | None = None, version: str | None = None) -> list[dict[str, Any]]:
        """Artifacts, newest release first, filtered by model name and version."""

    def artifact(self, artifact_id: str) -> dict[str, Any]:
        """One artifact row with ``manifest`` and ``signature`` decoded; NotFound when unknown."""

    def upsert_device(self, device_id: str, **fields: Any) -> None:
        """Create or update a device (profile, status, reported, last_seen, groups, tags, enrolled); a
        removed device is admitted again."""

    def update_from_device(self, device_id: str, **fields: Any) -> bool:
        """``upsert_device`` for what a device says about itself (status, reported state), unless the
        device was removed; False when ignored for that reason."""

    def remove_device(self, device_id: str) -> None:
        """Forget a device, its desired models and its tokens, and ignore its own messages from now on
        (until it is enrolled again); NotFound when unknown."""

    def devices_matching(self, target: str) -> list[dict[str, Any]]:
        """Devices for ``device:ID``, ``group:NAME`` or ``tag:KEY=VALUE``; ValueError for another form."""

    def add_enroll_token(self, token_sha256: str, expires: float, groups: list[str], tags: dict[str, str]) -> None:
        """Record a single-use enrollment token (by its sha256)."""

    def use_enroll_token(self, token_sha256: str, device_id: str) -> dict[str, Any] | None:
        """Mark the token used by ``device_id`` and return it (groups, tags), or None when it is unknown,
        used or expired; atomic, so a token enrolls one device only."""

    def devices(self) -> list[dict[str, Any]]: ...

    def device(self, device_id: str) -> dict[str, Any]:
        """One device; NotFound when unknown."""

    def create_deployment(self, name: str, version: str, target: str, assignments: dict[str, str]) -> str:
        """Record a deployment and set each device's desired artifact for that model; returns its id."""

    def deployments(self) -> list[dict[str, Any]]: ...

    def desired(self, device_id: str) -> list[dict[str, Any]]:
        """The models (name, version, artifact_id, deployment_id) a device should run."""

    def add_telemetry(self, batch: TelemetryBatch) -> bool:
        """Store a batch once per (device, epoch, seq); False for a duplicate. A device whose spool was
        made again (new epoch, ``seq`` from 1) is stored beside its old batches."""

    def telemetry(self, device_id: str | None = None) -> list[dict[str, Any]]: ...

    def telemetry_after(self, cursor: int, limit: int = 500) -> list[dict[str, Any]]:
        """Batches stored after ``cursor`` in arrival order, each with its own ``cursor`` (0: from the
        first), at most ``limit``: how the drift job reads what is new."""

    def audit(self, actor: str, action: str, detail: dict[str, Any]) -> None: ...

    def audit_log(self, since: float = 0.0, limit: int = 10_000) -> list[dict[str, Any]]:
        """Audit entries (id, ts, actor, action, detail) since ``since``, oldest first, the newest ``limit``."""

    def add_device_token(self, device_id: str, token_sha256: str) -> None:
        """Record a bearer token (by its sha256) that authenticates ``device_id`` on the cloud route."""

    def token_owner(self, token_sha256: str) -> str | None: ...

    def add_usage(self, counts: dict[tuple[str, str], int]) -> None:
        """Add cloud-call counts per (device, model)."""

    def usage(self) -> list[dict[str, Any]]: ...

    def try_lead(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew the lease ``name`` for ``holder`` until ``ttl_s`` from now, in one statement: True
        when ``holder`` holds it (it was free, expired or already its own), False when another does."""

    def resign(self, name: str, holder: str) -> None:
        """Give the lease ``name`` up if ``holder`` holds it (another replica may take it at once)."""

    def close(self) -> None:
        """Release the connection(s); the registry is not used after."""

    def sql_db(self) -> SqlDb:
        """The registry's database as the handle the hub's other stores (tokens, desired-state counters,
        rollouts, alerts, ...) keep their tables in (``cloud_hub/sqldb.py``): the same SQLite file, or the
        same PostgreSQL database and pool; one handle per registry, closed with it."""


def is_postgres_url(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


def open_registry(location: str) -> Registry:
    """A ``postgresql://`` (or ``postgres://``) URL: the PostgreSQL registry; anything else: a SQLite file."""
    if is_postgres_url(location):
        from cloud_hub.registry_pg import PostgresRegistry

        return PostgresRegistry(location)
    return SQLiteRegistry(location)


def select_devices(registry: Registry, target: str) -> list[dict[str, Any]]:
    """``Registry.devices_matching`` on any backend: ``device:ID``, ``group:NAME`` or ``tag:KEY=VALUE``."""
    kind, _, value = target.partition(":")
    if kind == "device" and value:
        return [registry.device(value)]
    if kind == "group" and value:
        return [d for d in registry.devices() if value in d["groups"]]
    key, eq, wanted = value.partition("=")
    if kind == "tag" and key and eq:
        return [d for d in registry.devices() if d["tags"].get(key) == wanted]
    raise ValueError(f"target {target!r}: use device:ID, group:NAME or tag:KEY=VALUE")


class SQLiteRegistry(TelemetryTables):
    """Registry on one SQLite file in WAL mode; the telemetry table and its methods are in
    ``registry_telemetry.py``."""

    def __init__(self, path: str) -> None:
        connection = sqlite3.connect(path, check_same_thread=False, timeout=30)
        self.db = sqlite_utils.Database(connection)
        self.db.enable_wal()
        self._lock = threading.RLock()
        with self._lock:
            self.schema_version = migrate_sqlite(connection, path)
        self._sql_db = SqliteDb(path)

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()
        self._sql_db.close()

    def sql_db(self) -> SqlDb:
        return self._sql_db

    def add_artifact(self, manifest: Manifest, signature: dict[str, Any]) -> bool:
        row = {
            "artifact_id": manifest.artifact_id,
            "name": manifest.name,
            "version": manifest.version,
            "release": manifest.release,
            "profile": manifest.hardware.profile,
            "precision": manifest.precision,
            "size": manifest.total_size,
            "manifest": json.dumps(manifest.to_wire()),
            "signature": json.dumps(signature),
            "created": time.time(),
        }
        with self._lock:
            exists = self.db.execute("SELECT 1 FROM artifacts WHERE artifact_id = ?", [row["artifact_id"]]).fetchone()
            if not exists:
                self.db.table("artifacts").insert(row)
            return not exists

    def artifacts(self, name: str | None = None, version: str | None = None) -> list[dict[str, Any]]:
        where, args = [], []
        for column, value in (("name", name), ("version", version)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        with self._lock:
            rows = self.db.table("artifacts").rows_where(" AND ".join(where) or None, args, order_by="release DESC")
            return [{k: v for k, v in r.items() if k not in ("manifest", "signature")} for r in rows]

    def artifact(self, artifact_id: str) -> dict[str, Any]:
        with self._lock:
            rows = list(self.db.table("artifacts").rows_where("artifact_id = ?", [artifact_id]))
        if not rows:
            raise NotFound(f"artifact {artifact_id} is not registered")
        row = rows[0]
        return {**row, "manifest": json.loads(row["manifest"]), "signature": json.loads(row["signature"])}

    def upsert_device(self, device_id: str, **fields: Any) -> None:
        with self._lock, self.db.conn:
            self.db.execute("DELETE FROM removed_devices WHERE device_id = ?", [device_id])
            self._upsert_device(device_id, fields)

    def update_from_device(self, device_id: str, **fields: Any) -> bool:
        with self._lock:
            if self.db.execute("SELECT 1 FROM removed_devices WHERE device_id = ?", [device_id]).fetchone():
                return False
            self._upsert_device(device_id, fields)
            return True

    def _upsert_device(self, device_id: str, fields: dict[str, Any]) -> None:
        for key in ("reported", "groups", "tags"):
            if key in fields:
                fields[key] = json.dumps(fields[key])
        self.db.table("devices").upsert({"device_id": device_id, **fields}, pk="device_id")

    def devices(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._device_row(r) for r in self.db.table("devices").rows_where(order_by="device_id")]

    def device(self, device_id: str) -> dict[str, Any]:
        with self._lock:
            rows = list(self.db.table("devices").rows_where("device_id = ?", [device_id]))
        if not rows:
            raise NotFound(f"device {device_id!r} is unknown; list devices with 'cloud-hub devices list'")
        return self._device_row(rows[0])

    @staticmethod
    def _device_row(row: dict[str, Any]) -> dict[str, Any]:
        return {
            **row,
            "reported": json.loads(row["reported"]) if row.get("reported") else None,
            "groups": json.loads(row["groups"]) if row.get("groups") else [],
            "tags": json.loads(row["tags"]) if row.get("tags") else {},
        }

    def remove_device(self, device_id: str) -> None:
        self.device(device_id)
        with self._lock, self.db.conn:
            for table in ("devices", "device_models", "device_tokens"):
                self.db.execute(f"DELETE FROM {table} WHERE device_id = ?", [device_id])
            self.db.execute("INSERT OR REPLACE INTO removed_devices VALUES (?, ?)", [device_id, time.time()])

    def devices_matching(self, target: str) -> list[dict[str, Any]]:
        return select_devices(self, target)

    def add_enroll_token(self, token_sha256: str, expires: float, groups: list[str], tags: dict[str, str]) -> None:
        with self._lock:
            self.db.table("enroll_tokens").insert({"token_sha256": token_sha256, "expires": expires,
                                                   "groups": json.dumps(groups), "tags": json.dumps(tags)})  # fmt: skip

    def use_enroll_token(self, token_sha256: str, device_id: str) -> dict[str, Any] | None:
        now = time.time()
        with self._lock, self.db.conn:
            cursor = self.db.execute(
                "UPDATE enroll_tokens SET used = ?, device_id = ? "
                "WHERE token_sha256 = ? AND used IS NULL AND expires > ?",
                [now, device_id, token_sha256, now],
            )
            if cursor.rowcount != 1:
                return None
            row = self.db.execute(
                "SELECT groups, tags FROM enroll_tokens WHERE token_sha256 = ?", [token_sha256]
            ).fetchone()
        return {"groups": json.loads(row[0]), "tags": json.loads(row[1])}

    def create_deployment(self, name: str, version: str, target: str, assignments: dict[str, str]) -> str:
        deployment_id = uuid.uuid4().hex[:12]
        with self._lock, self.db.conn:
            self.db.table("deployments").insert(
                {
                    "deployment_id": deployment_id,
                    "name": name,
                    "version": version,
                    "target": target,
                    "created": time.time(),
                    "devices": json.dumps(sorted(assignments)),
                }
            )
            for device_id, artifact_id in assignments.items():
                self.db.table("device_models").upsert(
                    {
                        "device_id": device_id,
                        "model": name,
                        "version": version,
                        "artifact_id": artifact_id,
                        "deployment_id": deployment_id,
                    },
                    pk=("device_id", "model"),
                )
        return deployment_id

    def deployments(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.db.table("deployments").rows_where(order_by="created DESC")
            return [{**r, "devices": json.loads(r["devices"])} for r in rows]

    def desired(self, device_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.db.table("device_models").rows_where("device_id = ?", [device_id], order_by="model"))

    def audit(self, actor: str, action: str, detail: dict[str, Any]) -> None:
        with self._lock:
            self.db.table("audit").insert(
                {
                    "ts": time.time(),
                    "actor": actor,
                    "action": action,
                    "detail": json.dumps(detail),
                }
            )

    def audit_log(self, since: float = 0.0, limit: int = 10_000) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.db.query(
                "SELECT * FROM (SELECT rowid AS id, ts, actor, action, detail FROM audit WHERE ts >= ? "
                "ORDER BY rowid DESC LIMIT ?) ORDER BY id",
                [since, limit],
            )
            return [{**r, "detail": json.loads(r["detail"] or "{}")} for r in rows]

    def add_device_token(self, device_id: str, token_sha256: str) -> None:
        with self._lock:
            self.db.table("device_tokens").insert(
                {"token_sha256": token_sha256, "device_id": device_id, "created": time.time()}, replace=True
            )

    def token_owner(self, token_sha256: str) -> str | None:
        with self._lock:
            row = self.db.execute(
                "SELECT device_id FROM device_tokens WHERE token_sha256 = ?", [token_sha256]
            ).fetchone()
        return str(row[0]) if row else None

    def add_usage(self, counts: dict[tuple[str, str], int]) -> None:
        with self._lock, self.db.conn:
            for (device_id, model), calls in counts.items():
                self.db.execute(
                    "INSERT INTO cloud_usage VALUES (?, ?, ?) ON CONFLICT(device_id, model) "
                    "DO UPDATE SET calls = calls + excluded.calls",
                    [device_id, model, calls],
                )

    def usage(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.db.table("cloud_usage").rows_where(order_by="device_id, model"))

    def try_lead(self, name: str, holder: str, ttl_s: float) -> bool:
        now = time.time()
        with self._lock, self.db.conn:  # committed, or rolled back when it fails
            row = self.db.execute(
                "INSERT INTO leases (name, holder, expires) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "holder = excluded.holder, expires = excluded.expires "
                "WHERE leases.holder = excluded.holder OR leases.expires < ? RETURNING holder",
                [name, holder, now + ttl_s, now],
            ).fetchall()  # every row read: the statement is done before the commit
        return bool(row)

    def resign(self, name: str, holder: str) -> None:
        with self._lock, self.db.conn:
            self.db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", [name, holder])
