"""The hub's signing of desired states: its own key, a counter per device that only grows, rollback marks.

    STATE/hub-key/hub.key   the hub's Ed25519 key for desired states (0600, made on first start); not an
                            artifact-signing key: it is never in trust/
    STATE/hub-key/hub.pub   its public half, sent to devices at enrollment (``hub_key``)
    the registry's database tables ``desired_signed`` (the last signed message per device),
                            ``desired_decisions`` (the deployments each device's messages carried) and
                            ``rollback_marks`` / ``rollback_deployments`` (signed rollbacks); SQLite
                            (STATE/registry.db) or PostgreSQL, shared by every hub replica

A device's desired state is signed once per decision (a deployment or rollback reaching it): publishing
the same models again for a deployment it already had (every broker reconnection, a hub restart, a device
asking) sends the very same signed message, so a device sees the
same counter and treats it as a repeat (idempotent; a local rollback stands), while any new decision gets
a counter above every earlier one: ``max(last + 1, the clock in ms)``, so even a hub that lost its
registry signs counters above those its devices hold (unless its clock went back). Replicas sharing a
PostgreSQL registry sign one device's state one at a time: each signing holds the device's row
(``SELECT ... FOR UPDATE``; SQLite: ``BEGIN IMMEDIATE``) from reading the last counter to storing the new
one, so no two messages ever carry the same counter and a later one never carries a lower counter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_hub.sqldb import SqlDb, open_db
from edge_agent.protocol.atomic import fsync_dir, fsync_tree
from edge_agent.protocol.canonical import canonical_json
from edge_agent.protocol.desired_signing import sign_desired
from edge_agent.protocol.messages import DesiredState
from edge_agent.protocol.signing import generate_keypair, key_id, load_private_key

HUB_KEY_DIR = "hub-key"
HUB_KEY_NAME = "hub"

_TABLES = (
    "CREATE TABLE IF NOT EXISTS desired_signed (device_id TEXT PRIMARY KEY, counter {int} NOT NULL, "
    "content TEXT NOT NULL, payload {blob} NOT NULL, signed {real} NOT NULL)",
    "CREATE TABLE IF NOT EXISTS desired_decisions (device_id TEXT NOT NULL, deployment_id TEXT NOT NULL, "
    "PRIMARY KEY (device_id, deployment_id))",
    "CREATE TABLE IF NOT EXISTS rollback_marks (device_id TEXT NOT NULL, model TEXT NOT NULL, "
    "artifact_id TEXT NOT NULL, PRIMARY KEY (device_id, model))",
    "CREATE TABLE IF NOT EXISTS rollback_deployments (deployment_id TEXT PRIMARY KEY, created {real} NOT NULL)",
)
_SQLITE = tuple(t.format(int="INTEGER", blob="BLOB", real="REAL") for t in _TABLES)
_POSTGRES = tuple(t.format(int="BIGINT", blob="BYTEA", real="DOUBLE PRECISION") for t in _TABLES)


def hub_key(state_dir: Path) -> Ed25519PrivateKey:
    """The hub's desired-state key, made on first use: written into a fresh directory renamed into place,
    so a crash never leaves half a key."""
    directory = state_dir / HUB_KEY_DIR
    if not (directory / f"{HUB_KEY_NAME}.key").exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".hub-key-", dir=state_dir))
        generate_keypair(staging, HUB_KEY_NAME)
        fsync_tree(staging)  # both halves on disk before the rename makes them the key
        try:
            os.rename(staging, directory)
        except OSError:  # another process made it first, or a leftover empty directory
            if not (directory / f"{HUB_KEY_NAME}.key").exists():
                raise
        fsync_dir(state_dir)
    return load_private_key(directory / f"{HUB_KEY_NAME}.key")


def hub_public_pem(state_dir: Path) -> str:
    return (state_dir / HUB_KEY_DIR / f"{HUB_KEY_NAME}.pub").read_text()


class DesiredSigner:
    """Signs each device's desired state with the hub key and keeps the counters (the registry's database:
    its ``sql_db()``, or a SQLite file's path)."""

    def __init__(self, state_dir: Path, db: SqlDb | str) -> None:
        self.key = hub_key(state_dir)
        self.public_pem = hub_public_pem(state_dir)
        self.db, self._owned = open_db(db)
        self.db.ddl(sqlite=_SQLITE, postgresql=_POSTGRES)

    def close(self) -> None:
        if self._owned:
            self.db.close()

    def payload(self, device_id: str, state: DesiredState | Callable[[], DesiredState]) -> bytes:
        """The signed message for ``state``: the stored one when its models are unchanged and its
        deployment is one the device already had (same counter); else, for a new decision, a new message
        with a higher counter, stored before it is returned (and published). ``state`` as a function is
        read while the device's row is locked, so across hub replicas a higher counter never carries
        older content (one replica's republish read before another's deploy, signed after it)."""
        key = self.key
        with self.db.transaction() as tx:
            # the device's row, locked until commit (made first if missing: there is then a row to lock)
            tx.execute("INSERT INTO desired_signed VALUES (?, 0, '', ?, 0) ON CONFLICT DO NOTHING", [device_id, b""])
            row = tx.execute("SELECT counter, content, payload FROM desired_signed WHERE device_id = ? FOR UPDATE",
                             [device_id])[0]  # fmt: skip
            state = state() if callable(state) else state
            content = _content(state, key)  # a message signed by a retired key is never sent again
            known = tx.execute("SELECT 1 AS known FROM desired_decisions WHERE device_id = ? AND deployment_id = ?",
                               [device_id, state.deployment_id])  # fmt: skip
            if row["content"] == content and known:
                return bytes(row["payload"])
            counter = max(int(row["counter"]) + 1, int(time.time() * 1000))
            signed = sign_desired(dataclasses.replace(state, device_id=device_id, counter=counter), key)
            tx.execute("UPDATE desired_signed SET counter = ?, content = ?, payload = ?, signed = ? "
                       "WHERE device_id = ?", [counter, content, signed, time.time(), device_id])  # fmt: skip
            tx.execute("INSERT INTO desired_decisions VALUES (?, ?) ON CONFLICT DO NOTHING",
                       [device_id, state.deployment_id])  # fmt: skip
        return signed

    def rekey(self, key: Ed25519PrivateKey, public_pem: str) -> None:
        """A rotated hub key (cloud_hub/keys.py): desired states are signed with it from now on; each
        device's stored message (its content names the old key) is signed again, under a new counter, the
        next time it is published."""
        self.key, self.public_pem = key, public_pem

    def counter(self, device_id: str) -> int:
        """The counter of the device's last signed desired state (0: none yet)."""
        rows = self.db.execute("SELECT counter FROM desired_signed WHERE device_id = ?", [device_id])
        return int(rows[0]["counter"]) if rows else 0

    def mark_rollback(self, model: str, assignments: dict[str, str]) -> None:
        """These devices may go below their installed release of ``model``, to these artifacts (set before
        the rollback's desired states are signed; any later deploy of that model to them ends it:
        ``clear_rollback``)."""
        with self.db.transaction() as tx:
            tx.executemany(
                "INSERT INTO rollback_marks (device_id, model, artifact_id) VALUES (?, ?, ?) "
                "ON CONFLICT (device_id, model) DO UPDATE SET artifact_id = excluded.artifact_id",
                [(device_id, model, artifact_id) for device_id, artifact_id in assignments.items()],
            )

    def clear_rollback(self, model: str, device_ids: list[str]) -> None:
        """An ordinary deploy of ``model`` to these devices: no rollback authorised any more (a later
        deploy of an old version is refused as a downgrade, never taken as a rollback)."""
        with self.db.transaction() as tx:
            tx.executemany("DELETE FROM rollback_marks WHERE device_id = ? AND model = ?",
                           [(device_id, model) for device_id in device_ids])  # fmt: skip

    def record_rollback_deployment(self, deployment_id: str) -> None:
        self.db.execute("INSERT INTO rollback_deployments VALUES (?, ?) ON CONFLICT (deployment_id) "
                        "DO UPDATE SET created = excluded.created", [deployment_id, time.time()])  # fmt: skip

    def is_rollback(self, device_id: str, model: str, artifact_id: str) -> bool:
        """Whether the hub decided to roll ``device_id`` back to this artifact of ``model``."""
        rows = self.db.execute("SELECT artifact_id FROM rollback_marks WHERE device_id = ? AND model = ?",
                               [device_id, model])  # fmt: skip
        return bool(rows) and rows[0]["artifact_id"] == artifact_id

    def rollback_deployment(self, deployment_id: str) -> bool:
        return bool(self.db.execute("SELECT 1 AS found FROM rollback_deployments WHERE deployment_id = ?",
                                    [deployment_id]))  # fmt: skip


def _content(state: DesiredState, key: Ed25519PrivateKey) -> str:
    """What a desired state decides (its models, not its deployment, issue time, counter or signature) and
    the key that signs it: after a rotation, even one a crash cut short, stored messages are signed anew."""
    body: dict[str, Any] = dataclasses.asdict(
        dataclasses.replace(state, deployment_id="", issued_at="", counter=0, signature={})
    )
    return hashlib.sha256(canonical_json(body)).hexdigest() + ":" + key_id(key.public_key())
