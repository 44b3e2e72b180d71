"""Which enrollment tokens may re-enroll an existing device id (``cloud-hub devices enroll-token --reenroll
ID``), and the pinned, signed enrollment answer (docs/security.md, "Enrollment").

A plain token enrolls only a device id the hub does not know; a token issued for re-enrollment enrolls
exactly the one id it names. The table lives in the registry's database (``Registry.sql_db()``: SQLite's
``registry.db`` or PostgreSQL) beside the registry's own.
"""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cloud_hub.sqldb import SqlDb, open_db
from edge_agent.protocol.signing import sign_document

MAX_ENROLL_BODY = 4096  # bytes: a token, a device id and a profile id
_SCHEMA = "CREATE TABLE IF NOT EXISTS enroll_reenroll (token_sha256 TEXT PRIMARY KEY, device_id TEXT NOT NULL)"


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """The sha256 (hex) of the raw 32-byte public key: what an enrollment token carries after its '.'."""
    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()


def sign_answer(answer: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """``answer`` with ``answer_signature``: the hub key's signature over the rest of it (canonical JSON)."""
    return {**answer, "answer_signature": sign_document(answer, key)}


class ReenrollGrants:
    def __init__(self, db: SqlDb | str) -> None:
        """``db``: the registry's ``sql_db()``, or a SQLite file's path."""
        self.db, self._owned = open_db(db)
        self.db.ddl(sqlite=[_SCHEMA], postgresql=[_SCHEMA])

    def add(self, token_sha256: str, device_id: str) -> None:
        self.db.execute("INSERT INTO enroll_reenroll VALUES (?, ?)", (token_sha256, device_id))

    def device_for(self, token_sha256: str) -> str | None:
        """The device id this token may re-enroll; None for a plain token."""
        found = self.db.execute("SELECT device_id FROM enroll_reenroll WHERE token_sha256 = ?", (token_sha256,))
        return str(found[0]["device_id"]) if found else None

    def close(self) -> None:
        if self._owned:
            self.db.close()
