"""Who may call the admin API, and the append-only audit trail of what they changed.

Roles, lowest first: ``viewer`` (read-only routes), ``deployer`` (also deploy, rollback, rollouts and
A/B tests), ``operator`` (everything). Every admin route names the lowest role that may call it
(``cloud_hub.api.routing.route``: ``x-role``); ``public`` routes need no token. A role may call a route
when its rank is at least the route's.

Tokens have a name and a role. The hub keeps only each token's sha256 (table ``admin_tokens`` in the
registry's database, SQLite or PostgreSQL: ``Registry.sql_db()``); the token itself is shown once, when
it is created. The state directory's ``operator.token`` keeps working as an operator token named
``bootstrap``.

The audit log is the registry's ``audit`` table: triggers refuse every UPDATE and DELETE on it (SQLite:
these, PostgreSQL: the registry's migration), so nothing (no route, no code path) can rewrite or remove
an entry.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from cloud_hub.errors import Conflict, NotFound
from cloud_hub.sqldb import SqlDb, open_db

# who the change being made is for, as the audit log names it: the admin token's name while the admin API
# runs a request; "operator" for calls made inside the hub's process (tests, scripts holding a Hub)
ACTOR: ContextVar[str] = ContextVar("edgefed_audit_actor", default="operator")

PUBLIC, VIEWER, DEPLOYER, OPERATOR = "public", "viewer", "deployer", "operator"
ROLES = (VIEWER, DEPLOYER, OPERATOR)  # lowest first
RANK = {PUBLIC: 0, VIEWER: 1, DEPLOYER: 2, OPERATOR: 3}
BOOTSTRAP = "bootstrap"  # the name of the state directory's operator.token
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SCHEMA_SQLITE = (
    "CREATE TABLE IF NOT EXISTS admin_tokens (name TEXT PRIMARY KEY, role TEXT NOT NULL, "
    "token_sha256 TEXT NOT NULL UNIQUE, created REAL NOT NULL, last_used REAL, revoked REAL)",
    "CREATE TABLE IF NOT EXISTS audit (ts FLOAT, actor TEXT, action TEXT, detail TEXT)",
)
_SCHEMA_PG = (  # the audit table and its trigger: the PostgreSQL registry's migration
    "CREATE TABLE IF NOT EXISTS admin_tokens (name TEXT PRIMARY KEY, role TEXT NOT NULL, "
    "token_sha256 TEXT NOT NULL UNIQUE, created DOUBLE PRECISION NOT NULL, last_used DOUBLE PRECISION, "
    "revoked DOUBLE PRECISION)",
)
APPEND_ONLY = (
    "CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit "
    "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit "
    "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
)


@dataclass(frozen=True)
class Principal:
    """The caller of one request: the token's name and role."""

    name: str
    role: str


def allows(role: str, needed: str) -> bool:
    """Whether a token of ``role`` may call a route that needs ``needed``."""
    return RANK[role] >= RANK[needed]


AuditLog = Callable[[float, int], list[dict[str, Any]]]


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """Named admin tokens and the audit log's reading side, in the registry's database."""

    def __init__(self, db: SqlDb | str, bootstrap_token: str, audit_log: AuditLog | None = None) -> None:
        """``db``: the registry's ``sql_db()``, or a SQLite file's path; ``audit_log``: where ``audit`` reads
        (the hub's Registry, which writes the entries, SQLite or PostgreSQL); None: the ``audit`` table of
        a SQLite ``db``."""
        self.audit_log = audit_log
        self.db, self._owned = open_db(db)
        self._bootstrap = bootstrap_token.encode()
        self.db.ddl(sqlite=(*_SCHEMA_SQLITE, *APPEND_ONLY), postgresql=_SCHEMA_PG)

    def create(self, name: str, role: str) -> dict[str, Any]:
        """A new token (returned once; only its sha256 is kept)."""
        if role not in ROLES:
            raise ValueError(f"role {role!r}: use one of {', '.join(ROLES)}")
        if name == BOOTSTRAP or not _NAME.match(name):
            raise ValueError(f"token name {name!r}: use 1-64 of a-z, 0-9, '.', '_', '-' (starting with a letter "
                             f"or digit), not {BOOTSTRAP!r}")  # fmt: skip
        token, now = secrets.token_urlsafe(32), time.time()
        added = self.db.execute(
            "INSERT INTO admin_tokens (name, role, token_sha256, created) VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING RETURNING name",
            [name, role, token_sha256(token), now],
        )
        if not added:
            row = self.db.execute("SELECT revoked FROM admin_tokens WHERE name = ?", [name])
            state = "was revoked (names are not reused, so the audit log stays unambiguous)" if row and row[0][
                "revoked"] else "exists; revoke it first ('cloud-hub tokens revoke NAME')"  # fmt: skip
            raise Conflict(f"token {name!r} {state}; or pick another name")
        return {"name": name, "role": role, "created": now, "token": token}

    def list_tokens(self) -> list[dict[str, Any]]:
        return self.db.execute("SELECT name, role, created, last_used, revoked FROM admin_tokens ORDER BY created")

    def revoke(self, name: str) -> dict[str, Any]:
        now = time.time()
        if self.db.execute("UPDATE admin_tokens SET revoked = ? WHERE name = ? AND revoked IS NULL RETURNING name",
                           [now, name]):  # fmt: skip
            return {"name": name, "revoked": now}
        if not self.db.execute("SELECT 1 AS found FROM admin_tokens WHERE name = ?", [name]):
            raise NotFound(f"no token named {name!r}; see 'cloud-hub tokens list'")
        raise Conflict(f"token {name!r} is already revoked")

    def resolve(self, supplied: str) -> Principal | None:
        """The caller behind a bearer token; None for a missing, unknown or revoked one."""
        if not supplied:
            return None
        if hmac.compare_digest(supplied.encode(), self._bootstrap):
            return Principal(BOOTSTRAP, OPERATOR)
        rows = self.db.execute("UPDATE admin_tokens SET last_used = ? WHERE token_sha256 = ? AND revoked IS NULL "
                               "RETURNING name, role", [time.time(), token_sha256(supplied)])  # fmt: skip
        return Principal(rows[0]["name"], rows[0]["role"]) if rows else None

    def audit(self, since: float = 0.0, limit: int = 10_000) -> list[dict[str, Any]]:
        """Audit entries since ``since`` (Unix seconds), oldest first, at most the newest ``limit``."""
        if self.audit_log is not None:
            return self.audit_log(since, limit)
        rows = self.db.execute(  # SQLite's audit table (a PostgreSQL one is read through the registry)
            "SELECT * FROM (SELECT rowid AS id, ts, actor, action, detail FROM audit WHERE ts >= ? "
            "ORDER BY rowid DESC LIMIT ?) AS newest ORDER BY id",
            [since, limit],
        )
        return [{**r, "detail": json.loads(r["detail"] or "{}")} for r in rows]

    def close(self) -> None:
        if self._owned:
            self.db.close()
