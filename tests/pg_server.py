"""A PostgreSQL server for the tests, and a fresh database per test.

Which server: ``EDGEFED_TEST_POSTGRES`` (a postgresql:// URL whose user may CREATE DATABASE) when set;
else the machine's local service on 127.0.0.1:5432 (user postgres, database ``test``, trust auth) when it
answers; else one started here from Debian's ``postgresql`` package (``/usr/lib/postgresql/*/bin``,
``make system-deps`` installs it): initdb in a temporary directory, a free port on 127.0.0.1, its unix
socket in that directory, fsync off. PostgreSQL refuses to run as root, so as root the server runs as
``nobody`` (``runuser``), owning the temporary directory.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

ENV = "EDGEFED_TEST_POSTGRES"
LOCAL = "postgresql://postgres@127.0.0.1:5432/test"
UNPRIVILEGED = "nobody"


def answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


def pg_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/N/bin`` with initdb and pg_ctl."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


class TempPostgres:
    """initdb + pg_ctl start in a temporary directory; ``url`` reaches it as user postgres."""

    def __init__(self, bin_dir: Path, port: int) -> None:
        self.bin_dir, self.port = bin_dir, port
        self.root = Path(tempfile.mkdtemp(prefix="edgefed-pg-"))
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.as_user = ["runuser", "-u", UNPRIVILEGED, "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.root, UNPRIVILEGED)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync", "--no-locale",
                  "-E", "UTF8")  # fmt: skip
        options = f"-k {self.root} -h 127.0.0.1 -p {port} -F -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        command = [*self.as_user, str(self.bin_dir / tool), *args]
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.root, timeout=120)
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr or done.stdout}\n{log}")

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def postgres_server(free_port: int) -> Iterator[str | None]:
    """The admin URL of a server to test against (see the module); None when there is none to be had."""
    if os.environ.get(ENV):
        yield os.environ[ENV]
        return
    if answers(LOCAL):
        yield LOCAL
        return
    bin_dir = pg_bin()
    if bin_dir is None:
        yield None
        return
    server = TempPostgres(bin_dir, free_port)
    try:
        yield server.url
    finally:
        server.stop()


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new, empty database on the server (random name), dropped after; yields its URL."""
    name = f"edgefed_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_database(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
