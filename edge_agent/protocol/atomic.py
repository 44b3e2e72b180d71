"""Crash-safe file operations: write to a temporary name, fsync, rename, fsync the directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def fsync_dir(directory: str | Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new content."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_tree(directory: str | Path) -> None:
    """fsync every file in a (flat) directory and the directory itself."""
    for entry in Path(directory).iterdir():
        if entry.is_file():
            with open(entry, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(directory)


def publish_dir(staging: str | Path, final: str | Path) -> None:
    """Atomically move a fully written staging directory to ``final`` (which must not exist)."""
    fsync_tree(staging)
    os.rename(staging, final)
    fsync_dir(Path(final).parent)


def remove_tree(path: str | Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
