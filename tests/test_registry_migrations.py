"""Versioned registry schema migrations (cloud_hub/migrations.py) on SQLite and PostgreSQL: a fresh
registry ends at the newest version, a registry made by edgefed before versioning opens and is migrated,
applying them again changes nothing, and a schema newer than this code is refused with the fix."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlite_utils

from cloud_hub.errors import RegistryError
from cloud_hub.migrations import PG_MIGRATIONS, SQLITE_MIGRATIONS, migrate_postgres, migrate_sqlite
from cloud_hub.registry import SQLiteRegistry, open_registry
from cloud_hub.registry_pg import PostgresRegistry
from edge_agent.protocol.messages import TelemetryBatch, TelemetryWindow

WINDOW = TelemetryWindow("gemm", "1.0.0", "local", 1.0, 2.0, 3, 0, 0.3, (3,))


OLD_TABLES: dict[str, tuple[dict[str, Any], Any]] = {  # SQLiteRegistry._create before versioned migrations
    "artifacts": ({"artifact_id": str, "name": str, "version": str, "release": int, "profile": str, "precision": str,
                   "size": int, "manifest": str, "signature": str, "created": float}, "artifact_id"),
    "devices": ({"device_id": str, "profile": str, "status": str, "reported": str, "last_seen": float, "groups": str,
                 "tags": str, "enrolled": float}, "device_id"),
    "deployments": ({"deployment_id": str, "name": str, "version": str, "target": str, "created": float,
                     "devices": str}, "deployment_id"),
    "device_models": ({"device_id": str, "model": str, "version": str, "artifact_id": str, "deployment_id": str},
                      ("device_id", "model")),
    "audit": ({"ts": float, "actor": str, "action": str, "detail": str}, None),
    "device_tokens": ({"token_sha256": str, "device_id": str, "created": float}, "token_sha256"),
    "cloud_usage": ({"device_id": str, "model": str, "calls": int}, ("device_id", "model")),
    "removed_devices": ({"device_id": str, "removed": float}, "device_id"),
    "enroll_tokens": ({"token_sha256": str, "expires": float, "used": float, "device_id": str, "groups": str,
                       "tags": str}, "token_sha256"),
}  # fmt: skip
OLD_TELEMETRY = """CREATE TABLE telemetry ("device_id" TEXT, "epoch" TEXT NOT NULL DEFAULT '', "seq" INTEGER,
    "received" REAL, "dropped" INTEGER, "windows" TEXT, "histograms" TEXT, PRIMARY KEY ("device_id", "epoch", "seq"))"""


def unversioned_registry(path: Path, telemetry_before_epochs: bool) -> None:
    """A registry.db as edgefed made it before versioned migrations (sqlite-utils tables made with
    if_not_exists, then the telemetry table), holding a device and a telemetry batch; optionally with the
    telemetry table of edgefed from before epochs (key (device_id, seq)), and without enroll_tokens (added
    later than the others)."""
    db = sqlite_utils.Database(sqlite3.connect(path))
    db.enable_wal()
    for name, (columns, pk) in OLD_TABLES.items():
        if not (telemetry_before_epochs and name == "enroll_tokens"):
            db.table(name).create(columns, pk=pk, if_not_exists=True)
    db.table("devices").insert({"device_id": "old", "profile": "x86-64-generic", "groups": '["lab"]', "tags": "{}"})
    if telemetry_before_epochs:
        columns = {"device_id": str, "seq": int, "received": float, "dropped": int, "windows": str, "histograms": str}
        db.table("telemetry").create(columns, pk=("device_id", "seq"))
    else:
        db.execute(OLD_TELEMETRY)
    db.table("telemetry").insert({"device_id": "old", "seq": 1, "received": 1.0, "dropped": 0,
                                  "windows": json.dumps([WINDOW.__dict__]), "histograms": "[]"})  # fmt: skip
    db.conn.commit()
    db.conn.close()


def sqlite_versions(path: Path) -> list[int]:
    with sqlite3.connect(path) as conn:
        return [row[0] for row in conn.execute("SELECT version FROM schema_version ORDER BY version")]


def pg_versions(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [row[0] for row in conn.execute("SELECT version FROM schema_version ORDER BY version")]


def test_a_fresh_sqlite_registry_is_at_the_newest_version_and_migrating_again_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    registry = SQLiteRegistry(str(path))
    assert registry.schema_version == len(SQLITE_MIGRATIONS)
    registry.close()
    assert sqlite_versions(path) == list(range(1, len(SQLITE_MIGRATIONS) + 1))
    conn = sqlite3.connect(path)
    schema = conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    assert migrate_sqlite(conn, str(path)) == len(SQLITE_MIGRATIONS)
    assert conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == schema
    conn.close()
    SQLiteRegistry(str(path)).close()
    assert sqlite_versions(path) == list(range(1, len(SQLITE_MIGRATIONS) + 1))


@pytest.mark.parametrize("before_epochs", [False, True], ids=["epochs", "before-epochs"])
def test_a_registry_from_before_versioning_opens_and_is_migrated(tmp_path: Path, before_epochs: bool) -> None:
    path = tmp_path / "registry.db"
    unversioned_registry(path, before_epochs)
    registry = SQLiteRegistry(str(path))
    assert sqlite_versions(path) == list(range(1, len(SQLITE_MIGRATIONS) + 1))
    assert registry.device("old")["groups"] == ["lab"]  # its rows kept
    assert [(t["epoch"], t["seq"]) for t in registry.telemetry("old")] == [("", 1)]
    assert not registry.add_telemetry(TelemetryBatch("old", 1, (WINDOW,)))  # still deduplicated
    assert registry.add_telemetry(TelemetryBatch("old", 1, (WINDOW,), epoch="e2"))
    registry.upsert_device("new", profile="x86-64-generic")  # the tables it lacked were made
    registry.add_enroll_token("t", 2e9, [], {})
    assert registry.use_enroll_token("t", "new") == {"groups": [], "tags": {}}
    registry.close()


def test_a_sqlite_schema_newer_than_known_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    SQLiteRegistry(str(path)).close()
    newer = len(SQLITE_MIGRATIONS) + 1
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_version VALUES (?, 0)", [newer])
    with pytest.raises(RegistryError) as raised:
        SQLiteRegistry(str(path))
    message = str(raised.value)
    assert f"schema version {newer}" in message and f"(version {len(SQLITE_MIGRATIONS)})" in message
    assert "Upgrade edgefed" in message and str(path) in message


def test_a_fresh_postgres_registry_is_at_the_newest_version_and_migrating_again_changes_nothing(
    postgres_url: str,
) -> None:
    first, second = open_registry(postgres_url), open_registry(postgres_url)  # the second finds it migrated
    assert isinstance(first, PostgresRegistry) and second.schema_version == len(PG_MIGRATIONS)  # type: ignore[attr-defined]
    first.close()
    second.close()
    assert pg_versions(postgres_url) == list(range(1, len(PG_MIGRATIONS) + 1))
    with psycopg.connect(postgres_url) as conn:
        assert migrate_postgres(conn, "test") == len(PG_MIGRATIONS)
    assert pg_versions(postgres_url) == list(range(1, len(PG_MIGRATIONS) + 1))


def test_the_postgres_audit_log_is_append_only(postgres_url: str) -> None:
    registry = open_registry(postgres_url)
    registry.audit("operator", "deploy", {})
    registry.close()
    with psycopg.connect(postgres_url) as conn:
        for statement in ("UPDATE audit SET actor = 'x'", "DELETE FROM audit", "TRUNCATE audit"):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"), conn.transaction():
                conn.execute(statement)  # type: ignore[arg-type]


def test_a_postgres_schema_newer_than_known_is_refused(postgres_url: str) -> None:
    open_registry(postgres_url).close()
    newer = len(PG_MIGRATIONS) + 3
    with psycopg.connect(postgres_url) as conn:
        conn.execute("INSERT INTO schema_version VALUES (%s, 0)", [newer])
    with pytest.raises(RegistryError) as raised:
        open_registry(postgres_url)
    message = str(raised.value)
    assert f"schema version {newer}" in message and f"(version {len(PG_MIGRATIONS)})" in message
    assert "Upgrade edgefed" in message


def test_an_unreachable_postgres_is_a_clear_error_without_the_password() -> None:
    from conftest import free_port

    url = f"postgresql://hub:s3cret@127.0.0.1:{free_port()}/edgefed"
    with pytest.raises(RegistryError) as raised:
        open_registry(url)
    message = str(raised.value)
    assert "cannot connect" in message and "--registry" in message and "s3cret" not in message
