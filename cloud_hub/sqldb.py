"""One SQL database handle for the hub's stores (tokens, desired-state counters, re-enroll grants, rollouts,
A/B tests, alerts, drift, the metrics collector's reads), on SQLite or PostgreSQL: the registry's database.

``Registry.sql_db()`` gives the hub's handle: ``SqliteDb`` over the registry's SQLite file, or
``PostgresDb`` over the PostgreSQL registry's connection pool, so with ``--registry postgresql://...``
every replica's stores share one database. A store writes its SQL once, portable:

- ``?`` placeholders (``PostgresDb`` sends them as ``%s``, a literal ``%`` as ``%%``);
- ``INSERT ... ON CONFLICT (...) DO UPDATE SET c = excluded.c`` / ``ON CONFLICT DO NOTHING``, ``RETURNING``;
- every computed column named (``COUNT(*) AS n``): rows are dicts by column name;
- ``SELECT ... FOR UPDATE`` (last) in a ``transaction()``: PostgreSQL locks the rows; SQLite has no such
  clause and needs none, since ``BEGIN IMMEDIATE`` already holds the file's write lock (``SqliteDb`` drops it);
- types and identity columns differ by dialect in the schema only: ``ddl(sqlite=..., postgresql=...)``.

``execute`` runs one statement in its own transaction; ``transaction()`` yields a ``Tx`` whose
statements commit together, or not at all when the block raises. Both handles are thread-safe.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, LiteralString, Protocol

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

Row = dict[str, Any]
_FOR_UPDATE = re.compile(r"\s+FOR\s+UPDATE\s*$", re.IGNORECASE)
_LITERALS = re.compile(r"('(?:[^']|'')*')")  # single-quoted SQL strings: no placeholders inside
PG_DDL_LOCK_KEY = 0x6564_6765_7374_6F  # pg_advisory_xact_lock key: stores creating their tables ("edgestore")


class Tx(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Run one statement; its rows (none for a statement without a result)."""

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...


class SqlDb(Protocol):
    kind: str  # "sqlite" | "postgresql"

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Run one statement in its own transaction; its rows."""

    def transaction(self, read_only: bool = False) -> AbstractContextManager[Tx]:
        """All-or-nothing statements (rolled back when the block raises); ``read_only``: one consistent
        snapshot to read, taking no write lock."""

    def ddl(self, sqlite: Sequence[str], postgresql: Sequence[str]) -> None:
        """Run this dialect's schema statements (``CREATE ... IF NOT EXISTS``) in one transaction."""

    def close(self) -> None:
        """Release what this handle opened (not a pool it was given)."""


def open_db(where: SqlDb | str) -> tuple[SqlDb, bool]:
    """A store's handle: a path opens a SQLite file of its own (True: the store closes it); a handle is
    shared (False: its owner, the registry, closes it)."""
    if isinstance(where, str):
        return SqliteDb(where), True
    return where, False


def to_psycopg(query: str) -> str:
    """``query`` for psycopg: each ``?`` outside quoted strings as ``%s``, each literal ``%`` as ``%%``."""
    parts = _LITERALS.split(query)
    return "".join(p.replace("%", "%%") if i % 2 else p.replace("%", "%%").replace("?", "%s")
                   for i, p in enumerate(parts))  # fmt: skip


def _dict_row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> Row:
    return {column[0]: value for column, value in zip(cursor.description, row, strict=True)}


class _SqliteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self.conn.execute(_FOR_UPDATE.sub("", sql), params).fetchall()

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.conn.executemany(sql, rows)


class SqliteDb:
    """One SQLite file (WAL, 30 s busy timeout): one autocommit connection behind a lock; a transaction is
    ``BEGIN IMMEDIATE`` … ``COMMIT`` (the file's write lock from the start, so a read-then-write is never
    overtaken by another connection or process)."""

    kind = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        self.conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self.conn.row_factory = _dict_row
        self._lock = threading.RLock()
        with self._lock:
            self.conn.execute("PRAGMA journal_mode=WAL")
        self._tx = _SqliteTx(self.conn)
        self._reader: sqlite3.Connection | None = None  # read-only snapshots (transaction(read_only=True))
        self._reader_lock = threading.Lock()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._lock:
            return self._tx.execute(sql, params)

    @contextmanager
    def transaction(self, read_only: bool = False) -> Iterator[Tx]:
        """All or nothing. ``read_only``: one snapshot on a reader connection of its own (WAL lets it read
        beside the writer), so a long read, such as a metrics scrape, holds up no store's writes."""
        if read_only:
            with self._reading() as tx:
                yield tx
            return
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._tx
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:  # a failed COMMIT too: the connection never stays inside one
                    self.conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _reading(self) -> Iterator[Tx]:
        with self._reader_lock:
            if self._reader is None:
                self._reader = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
                self._reader.row_factory = _dict_row
            self._reader.execute("BEGIN")
            try:
                yield _SqliteTx(self._reader)
            finally:
                self._reader.execute("ROLLBACK")

    def ddl(self, sqlite: Sequence[str], postgresql: Sequence[str]) -> None:
        with self.transaction() as tx:
            for statement in sqlite:
                tx.execute(statement)

    def close(self) -> None:
        with self._lock, self._reader_lock:
            self.conn.close()
            if self._reader is not None:
                self._reader.close()


class _PostgresTx:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        from psycopg.rows import dict_row

        with self.conn.cursor(row_factory=dict_row) as cursor:  # the pooled connection keeps its tuple rows
            cursor.execute(_query(sql), params)
            return cursor.fetchall() if cursor.description else []

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self.conn.cursor() as cursor:
            cursor.executemany(_query(sql), rows)


def _query(sql: str) -> LiteralString:
    """The statement as psycopg takes it: the stores' SQL is constant text written in this package (values
    always go as parameters), so treating it as a literal string is sound."""
    return to_psycopg(sql)  # mypy takes LiteralString as str


class PostgresDb:
    """A PostgreSQL database through a ``psycopg_pool.ConnectionPool`` (the registry's; ``connect`` makes
    one of its own); each ``execute`` and ``transaction`` holds a connection for its duration (READ
    COMMITTED: rows a read-then-write depends on are locked with ``SELECT ... FOR UPDATE``)."""

    kind = "postgresql"

    def __init__(self, pool: ConnectionPool, owned: bool = False) -> None:
        self._pool, self._owned = pool, owned

    @classmethod
    def connect(cls, url: str, max_connections: int = 4) -> PostgresDb:
        from psycopg_pool import ConnectionPool

        return cls(ConnectionPool(url, min_size=1, max_size=max_connections, open=True, name="edgefed-sqldb"), True)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self.transaction() as tx:
            return tx.execute(sql, params)

    @contextmanager
    def transaction(self, read_only: bool = False) -> Iterator[Tx]:
        with self._pool.connection() as conn:  # commits on leaving, rolls back when the block raises
            if read_only:
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield _PostgresTx(conn)

    def ddl(self, sqlite: Sequence[str], postgresql: Sequence[str]) -> None:
        """Under an advisory lock: replicas starting together would otherwise race on CREATE ... IF NOT EXISTS."""
        with self.transaction() as tx:
            tx.execute("SELECT pg_advisory_xact_lock(?)", [PG_DDL_LOCK_KEY])
            for statement in postgresql:
                tx.execute(statement)

    def close(self) -> None:
        if self._owned:
            self._pool.close()
