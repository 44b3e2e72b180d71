"""Versioned schema migrations of the registry, one ordered list per backend (SQLite, PostgreSQL).

Migration N takes a registry from schema version N-1 to N; the table ``schema_version`` records each
applied version (one row each, with when). Opening a registry applies the missing migrations in one
transaction (on PostgreSQL under an advisory lock, so hub replicas starting together migrate once), and
refuses a schema newer than this code knows: ``RegistryError`` naming both versions and the fix.

A SQLite registry from before versioning (no ``schema_version`` table; tables made with
``create(..., if_not_exists=True)``) is version 0: migration 1 creates whatever table is missing,
leaves existing ones as they are and rebuilds a telemetry table from before epochs, so it ends at 1.

To change the schema, append a migration to both lists (never edit an applied one) and bump nothing
else: the known version is the length of the list.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, LiteralString, TypeVar

from cloud_hub.errors import RegistryError

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")
PG_LOCK_KEY = 0x6564_6765_6665_64  # pg_advisory_xact_lock key of registry migrations ("edgefed")

_SQLITE_TABLES = (
    """CREATE TABLE IF NOT EXISTS "artifacts" ("artifact_id" TEXT PRIMARY KEY, "name" TEXT, "version" TEXT,
    "release" INTEGER, "profile" TEXT, "precision" TEXT, "size" INTEGER, "manifest" TEXT, "signature" TEXT,
    "created" REAL)""",
    """CREATE TABLE IF NOT EXISTS "devices" ("device_id" TEXT PRIMARY KEY, "profile" TEXT, "status" TEXT,
    "reported" TEXT, "last_seen" REAL, "groups" TEXT, "tags" TEXT, "enrolled" REAL)""",
    """CREATE TABLE IF NOT EXISTS "deployments" ("deployment_id" TEXT PRIMARY KEY, "name" TEXT, "version" TEXT,
    "target" TEXT, "created" REAL, "devices" TEXT)""",
    """CREATE TABLE IF NOT EXISTS "device_models" ("device_id" TEXT, "model" TEXT, "version" TEXT,
    "artifact_id" TEXT, "deployment_id" TEXT, PRIMARY KEY ("device_id", "model"))""",
    """CREATE TABLE IF NOT EXISTS "audit" ("ts" REAL, "actor" TEXT, "action" TEXT, "detail" TEXT)""",
    """CREATE TABLE IF NOT EXISTS "device_tokens" ("token_sha256" TEXT PRIMARY KEY, "device_id" TEXT,
    "created" REAL)""",
    """CREATE TABLE IF NOT EXISTS "cloud_usage" ("device_id" TEXT, "model" TEXT, "calls" INTEGER,
    PRIMARY KEY ("device_id", "model"))""",
    """CREATE TABLE IF NOT EXISTS "removed_devices" ("device_id" TEXT PRIMARY KEY, "removed" REAL)""",
    """CREATE TABLE IF NOT EXISTS "enroll_tokens" ("token_sha256" TEXT PRIMARY KEY, "expires" REAL, "used" REAL,
    "device_id" TEXT, "groups" TEXT, "tags" TEXT)""",
)
_SQLITE_TELEMETRY = """CREATE TABLE {name} ("device_id" TEXT, "epoch" TEXT NOT NULL DEFAULT '', "seq" INTEGER,
    "received" REAL, "dropped" INTEGER, "windows" TEXT, "histograms" TEXT, PRIMARY KEY ("device_id", "epoch", "seq"))"""
_TELEMETRY_COLUMNS = "device_id, epoch, seq, received, dropped, windows, histograms"


def _sqlite_1_baseline(conn: sqlite3.Connection) -> None:
    """The tables of edgefed before versioning, each made if missing; a telemetry table from before epochs
    (key (device, seq)) rebuilt with epoch "" (SQLite cannot alter a primary key: new table, copy, swap)."""
    for statement in _SQLITE_TABLES:
        conn.execute(statement)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(telemetry)")}
    if not columns:
        conn.execute(_SQLITE_TELEMETRY.format(name="telemetry"))
    elif "epoch" not in columns:
        conn.execute(_SQLITE_TELEMETRY.format(name="telemetry_epochs"))
        conn.execute(
            f"INSERT INTO telemetry_epochs ({_TELEMETRY_COLUMNS}) "
            "SELECT device_id, '', seq, received, dropped, windows, histograms FROM telemetry ORDER BY rowid"
        )
        conn.execute("DROP TABLE telemetry")
        conn.execute("ALTER TABLE telemetry_epochs RENAME TO telemetry")


_LEASES = """CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires {real} NOT NULL)"""


def _sqlite_2_leases(conn: sqlite3.Connection) -> None:
    """The leader lease of hub replicas (cloud_hub/leader.py)."""
    conn.execute(_LEASES.format(real="REAL"))


SQLITE_MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_sqlite_1_baseline, _sqlite_2_leases)

# PostgreSQL: JSON as JSONB except the signed manifest and its signature (TEXT: kept byte for byte);
# telemetry's ``cursor`` (identity) is the arrival order telemetry_after reads by.
_PG_1_BASELINE: tuple[LiteralString, ...] = (
    """CREATE TABLE artifacts (artifact_id TEXT PRIMARY KEY, name TEXT NOT NULL, version TEXT NOT NULL,
    release BIGINT NOT NULL, profile TEXT, precision TEXT, size BIGINT, manifest TEXT NOT NULL,
    signature TEXT NOT NULL, created DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX artifacts_name_version ON artifacts (name, version)",
    """CREATE TABLE devices (device_id TEXT PRIMARY KEY, profile TEXT, status TEXT, reported JSONB,
    last_seen DOUBLE PRECISION, groups JSONB, tags JSONB, enrolled DOUBLE PRECISION)""",
    """CREATE TABLE deployments (deployment_id TEXT PRIMARY KEY, name TEXT NOT NULL, version TEXT NOT NULL,
    target TEXT NOT NULL, created DOUBLE PRECISION NOT NULL, devices JSONB NOT NULL)""",
    """CREATE TABLE device_models (device_id TEXT, model TEXT, version TEXT NOT NULL, artifact_id TEXT NOT NULL,
    deployment_id TEXT NOT NULL, PRIMARY KEY (device_id, model))""",
    """CREATE TABLE audit (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, ts DOUBLE PRECISION NOT NULL,
    actor TEXT NOT NULL, action TEXT NOT NULL, detail JSONB NOT NULL)""",
    """CREATE FUNCTION edgefed_append_only() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$""",
    """CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION edgefed_append_only()""",
    """CREATE TABLE device_tokens (token_sha256 TEXT PRIMARY KEY, device_id TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE cloud_usage (device_id TEXT, model TEXT, calls BIGINT NOT NULL,
    PRIMARY KEY (device_id, model))""",
    "CREATE TABLE removed_devices (device_id TEXT PRIMARY KEY, removed DOUBLE PRECISION NOT NULL)",
    """CREATE TABLE enroll_tokens (token_sha256 TEXT PRIMARY KEY, expires DOUBLE PRECISION NOT NULL,
    used DOUBLE PRECISION, device_id TEXT, groups JSONB NOT NULL, tags JSONB NOT NULL)""",
    """CREATE TABLE telemetry (cursor BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, device_id TEXT NOT NULL,
    epoch TEXT NOT NULL DEFAULT '', seq BIGINT NOT NULL, received DOUBLE PRECISION NOT NULL,
    dropped BIGINT NOT NULL, windows JSONB NOT NULL, histograms JSONB NOT NULL DEFAULT '[]',
    CONSTRAINT telemetry_once UNIQUE (device_id, epoch, seq))""",
)

# 2: the leader lease of hub replicas (cloud_hub/leader.py)
_PG_2_LEASES: tuple[LiteralString, ...] = (
    "CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires DOUBLE PRECISION NOT NULL)",
)

PG_MIGRATIONS: tuple[tuple[LiteralString, ...], ...] = (_PG_1_BASELINE, _PG_2_LEASES)


def pending(found: int, migrations: Sequence[T], where: str) -> Sequence[T]:
    """The migrations a registry at version ``found`` lacks; RegistryError when it is newer than known."""
    known = len(migrations)
    if found > known:
        raise RegistryError(
            f"registry {where}: schema version {found} is newer than this edgefed knows (version {known}); a "
            "newer edgefed has migrated it. Upgrade edgefed on this hub (pip install -U 'edgefed[hub]') to the "
            "version the other hubs run; never point an older hub at it"
        )
    return migrations[found:]


def migrate_sqlite(conn: sqlite3.Connection, where: str) -> int:
    """Bring a SQLite registry to the newest schema in one transaction; returns its version."""
    conn.execute("BEGIN IMMEDIATE")  # one writer: a hub and its inference workers opening together migrate once
    try:
        conn.execute('CREATE TABLE IF NOT EXISTS "schema_version" ("version" INTEGER PRIMARY KEY, "applied" REAL)')
        found = int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])
        for version, step in enumerate(pending(found, SQLITE_MIGRATIONS, where), start=found + 1):
            step(conn)
            conn.execute("INSERT INTO schema_version VALUES (?, ?)", [version, time.time()])
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return max(found, len(SQLITE_MIGRATIONS))


def migrate_postgres(conn: psycopg.Connection[Any], where: str) -> int:
    """Bring a PostgreSQL registry to the newest schema in one transaction; returns its version."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [PG_LOCK_KEY])
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied FLOAT8)")
        row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
        found = int(row[0]) if row else 0
        for version, statements in enumerate(pending(found, PG_MIGRATIONS, where), start=found + 1):
            for statement in statements:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version VALUES (%s, %s)", [version, time.time()])
    return max(found, len(PG_MIGRATIONS))


def schema_version_sqlite(conn: sqlite3.Connection) -> int:
    """The version a SQLite registry is at (0: unversioned)."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_version'").fetchone():
        return 0
    return int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])
