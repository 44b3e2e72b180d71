"""The hub's signing of desired states: its own key, a counter per device that only grows, rollback marks.

    STATE/hub-key/hub.key   the hub's Ed25519 key for desired states (0600, made on first start); not an
                            artifact-signing key: it is never in trust/
    STATE/hub-key/hub.pub   its public half, sent to devices at enrollment (``hub_key``)
    registry.db             tables ``desired_signed`` (the last signed message per device),
                            ``desired_decisions`` (the deployments each device's messages carried) and
                            ``rollback_marks`` / ``rollback_deployments`` (signed rollbacks)

A device's desired state is signed once per decision (a deployment or rollback reaching it): publishing
the same models again for a deployment it already had (every broker reconnection, a hub restart, a device
asking) sends the very same signed message, so a device sees the
same counter and treats it as a repeat (idempotent; a local rollback stands), while any new decision gets
a counter above every earlier one: ``max(last + 1, the clock in ms)``, so even a hub that lost its
registry signs counters above those its devices hold (unless its clock went back).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.protocol.atomic import fsync_dir, fsync_tree
from edge_agent.protocol.canonical import canonical_json
from edge_agent.protocol.desired_signing import sign_desired
from edge_agent.protocol.messages import DesiredState
from edge_agent.protocol.signing import generate_keypair, key_id, load_private_key

HUB_KEY_DIR = "hub-key"
HUB_KEY_NAME = "hub"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS desired_signed (
    device_id TEXT PRIMARY KEY, counter INTEGER NOT NULL, content TEXT NOT NULL, payload BLOB NOT NULL,
    signed REAL NOT NULL);
CREATE TABLE IF NOT EXISTS desired_decisions (
    device_id TEXT NOT NULL, deployment_id TEXT NOT NULL, PRIMARY KEY (device_id, deployment_id));
CREATE TABLE IF NOT EXISTS rollback_marks (
    device_id TEXT NOT NULL, model TEXT NOT NULL, artifact_id TEXT NOT NULL, PRIMARY KEY (device_id, model));
CREATE TABLE IF NOT EXISTS rollback_deployments (deployment_id TEXT PRIMARY KEY, created REAL NOT NULL);
"""


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
    """Signs each device's desired state with the hub key and keeps the counters (``registry.db``)."""

    def __init__(self, state_dir: Path, db_path: str) -> None:
        self.key = hub_key(state_dir)
        self.public_pem = hub_public_pem(state_dir)
        self.db = sqlite3.connect(db_path, timeout=30, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            self.db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN … COMMIT, rolled back on any error (the connection is never left inside a transaction);
        the caller holds ``_lock``."""
        self.db.execute("BEGIN")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def payload(self, device_id: str, state: DesiredState) -> bytes:
        """The signed message for ``state``: the stored one when its models are unchanged and its
        deployment is one the device already had (same counter); else, for a new decision, a new message
        with a higher counter, stored before it is returned (and published)."""
        with self._lock:
            content = _content(state, self.key)  # a message signed by a retired key is never sent again
            row = self.db.execute(
                "SELECT counter, content, payload FROM desired_signed WHERE device_id = ?", [device_id]
            ).fetchone()
            known = self.db.execute(
                "SELECT 1 FROM desired_decisions WHERE device_id = ? AND deployment_id = ?",
                [device_id, state.deployment_id],
            ).fetchone()
            if row is not None and row[1] == content and known is not None:
                return bytes(row[2])
            counter = max((row[0] if row else 0) + 1, int(time.time() * 1000))
            signed = sign_desired(dataclasses.replace(state, device_id=device_id, counter=counter), self.key)
            with self._transaction() as db:
                db.execute(
                    "INSERT OR REPLACE INTO desired_signed (device_id, counter, content, payload, signed) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [device_id, counter, content, signed, time.time()],
                )
                db.execute("INSERT OR IGNORE INTO desired_decisions VALUES (?, ?)", [device_id, state.deployment_id])
            return signed

    def rekey(self, key: Ed25519PrivateKey, public_pem: str) -> None:
        """A rotated hub key (cloud_hub/keys.py): desired states are signed with it from now on; each
        device's stored message (its content names the old key) is signed again, under a new counter, the
        next time it is published."""
        with self._lock:
            self.key, self.public_pem = key, public_pem

    def counter(self, device_id: str) -> int:
        """The counter of the device's last signed desired state (0: none yet)."""
        with self._lock:
            row = self.db.execute("SELECT counter FROM desired_signed WHERE device_id = ?", [device_id]).fetchone()
        return int(row[0]) if row else 0

    def mark_rollback(self, model: str, assignments: dict[str, str]) -> None:
        """These devices may go below their installed release of ``model``, to these artifacts (set before
        the rollback's desired states are signed; any later deploy of that model to them ends it:
        ``clear_rollback``)."""
        with self._lock, self._transaction() as db:
            for device_id, artifact_id in assignments.items():
                db.execute(
                    "INSERT OR REPLACE INTO rollback_marks (device_id, model, artifact_id) VALUES (?, ?, ?)",
                    [device_id, model, artifact_id],
                )

    def clear_rollback(self, model: str, device_ids: list[str]) -> None:
        """An ordinary deploy of ``model`` to these devices: no rollback authorised any more (a later
        deploy of an old version is refused as a downgrade, never taken as a rollback)."""
        with self._lock, self._transaction() as db:
            db.executemany("DELETE FROM rollback_marks WHERE device_id = ? AND model = ?",
                           [(device_id, model) for device_id in device_ids])  # fmt: skip

    def record_rollback_deployment(self, deployment_id: str) -> None:
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO rollback_deployments VALUES (?, ?)", [deployment_id, time.time()])

    def is_rollback(self, device_id: str, model: str, artifact_id: str) -> bool:
        """Whether the hub decided to roll ``device_id`` back to this artifact of ``model``."""
        with self._lock:
            row = self.db.execute(
                "SELECT artifact_id FROM rollback_marks WHERE device_id = ? AND model = ?", [device_id, model]
            ).fetchone()
        return row is not None and row[0] == artifact_id

    def rollback_deployment(self, deployment_id: str) -> bool:
        with self._lock:
            row = self.db.execute(
                "SELECT 1 FROM rollback_deployments WHERE deployment_id = ?", [deployment_id]
            ).fetchone()
        return row is not None


def _content(state: DesiredState, key: Ed25519PrivateKey) -> str:
    """What a desired state decides (its models, not its deployment, issue time, counter or signature) and
    the key that signs it: after a rotation, even one a crash cut short, stored messages are signed anew."""
    body: dict[str, Any] = dataclasses.asdict(
        dataclasses.replace(state, deployment_id="", issued_at="", counter=0, signature={})
    )
    return hashlib.sha256(canonical_json(body)).hexdigest() + ":" + key_id(key.public_key())
