"""The hub's signed key set on disk, and the hub-key files a rotation replaces (crash-safe).

    STATE/keyset/current.json        the key set in force (its envelope, as signed)
    STATE/keyset/root-NNNNNN.json    every key set that changed the hub (root) keys, version 1 included:
                                     the chain a device walks when it missed rotations
    STATE/hub-key/hub.key, hub.pub   the hub key in force (cloud_hub/desired_signing.py)
    STATE/hub-key/hub-next.key, .pub the new hub key while a rotation is under way (0600 from creation)

A rotation writes the new key, then the key set signed by the old and the new key (``root-…``, then
``current.json``: the commit), then renames the new key over the old one. ``finish_rotation`` completes
one a crash interrupted after the commit, and throws away one interrupted before it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_hub.desired_signing import HUB_KEY_DIR, HUB_KEY_NAME
from edge_agent.protocol.atomic import atomic_write_bytes, fsync_dir, fsync_tree
from edge_agent.protocol.canonical import canonical_json, strict_loads
from edge_agent.protocol.errors import KeySetRefused
from edge_agent.protocol.keyset import KeySet, parse
from edge_agent.protocol.signing import generate_keypair, key_id, load_private_key, load_public_key

KEYSET_DIR = "keyset"
CURRENT = "current.json"
NEXT_NAME = "hub-next"


def load(path: Path) -> KeySet:
    """The key set in ``path``; ValueError naming the file when it is not a well-formed one."""
    try:
        return parse(strict_loads(path.read_bytes()))
    except (OSError, ValueError, KeySetRefused) as exc:
        raise ValueError(f"{path}: not a usable key set ({exc}); restore it from a backup") from None


class KeySetFiles:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.dir = state_dir / KEYSET_DIR
        self.key_dir = state_dir / HUB_KEY_DIR

    def current(self) -> KeySet | None:
        path = self.dir / CURRENT
        return load(path) if path.exists() else None

    def chain(self) -> list[dict[str, Any]]:
        """Every key set that changed the roots, oldest first (what a device walks to reach the newest)."""
        return [load(p).envelope for p in sorted(self.dir.glob("root-*.json"))]

    def save(self, keyset: KeySet, roots_changed: bool) -> None:
        """Store ``keyset`` as the one in force (``root-…`` first when it changed the roots)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        data = canonical_json(keyset.envelope)
        if roots_changed:
            atomic_write_bytes(self.dir / f"root-{keyset.version:06d}.json", data)
        atomic_write_bytes(self.dir / CURRENT, data)

    def new_hub_key(self) -> Ed25519PrivateKey:
        """A new hub key beside the one in force (``hub-next.key``, 0600 from creation), on disk: made in a
        staging directory and renamed into place, private half first, so no half-written file is ever seen."""
        staging = Path(tempfile.mkdtemp(prefix=".hub-next-", dir=self.state_dir))
        try:
            generate_keypair(staging, NEXT_NAME)
            fsync_tree(staging)
            for suffix in (".key", ".pub"):
                os.replace(staging / f"{NEXT_NAME}{suffix}", self.key_dir / f"{NEXT_NAME}{suffix}")
            fsync_dir(self.key_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return load_private_key(self.key_dir / f"{NEXT_NAME}.key")

    def promote_next(self) -> None:
        """The new hub key becomes the hub key (the old one is gone: retired)."""
        for suffix in (".pub", ".key"):
            source = self.key_dir / f"{NEXT_NAME}{suffix}"
            if source.exists():
                os.replace(source, self.key_dir / f"{HUB_KEY_NAME}{suffix}")
        fsync_dir(self.key_dir)

    def finish_rotation(self) -> None:
        """Complete a rotation that reached its commit (the key set in force names the new key), or throw
        away one that did not (its new key and any ``root-…`` above the key set in force)."""
        pending = [self.key_dir / f"{NEXT_NAME}{s}" for s in (".pub", ".key")]
        current = self.current()
        if not any(p.exists() for p in pending):
            return
        committed = False
        try:
            if pending[0].exists() and current is not None:
                committed = key_id(load_public_key(pending[0])) in current.roots
            elif current is not None:  # only the private half: renamed in first, or its public one promoted
                committed = key_id(load_private_key(pending[1]).public_key()) in current.roots
        except (OSError, ValueError, TypeError):  # unreadable: it cannot have been committed (fsynced before)
            committed = False
        if committed:
            self.promote_next()
            return
        for path in pending:
            path.unlink(missing_ok=True)
        for path in self.dir.glob("root-*.json"):
            if current is None or int(path.stem.split("-")[1]) > current.version:
                path.unlink()
        fsync_dir(self.key_dir)
