"""Sealing (hub/compiler side) and verifying (agent side) an artifact directory.

An artifact directory holds ``manifest.json``, ``signature`` and the files the manifest lists. Each
file is split into ``chunk_size`` pieces whose sha256 values the manifest carries, so a transfer can be
verified (and resumed) chunk by chunk.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.protocol.atomic import atomic_write_bytes
from edge_agent.protocol.canonical import sha256_hex, strict_loads
from edge_agent.protocol.errors import ArtifactRejected
from edge_agent.protocol.manifest import DEFAULT_CHUNK_SIZE, SCHEMA, FileEntry, Manifest, manifest_from_wire
from edge_agent.protocol.signing import TrustStore, sign_document, verify_document

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "signature"
RESERVED = (MANIFEST_FILE, SIGNATURE_FILE)
MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # a manifest of a 4 GiB model in 256 KiB chunks is about 1.2 MB
MAX_SIGNATURE_BYTES = 64 * 1024
COPY_BLOCK = 1024 * 1024


@contextmanager
def open_regular(path: Path) -> Iterator[tuple[int, int]]:
    """Open ``path`` (a symlink is followed) and yield ``(fd, size)`` when it is a regular file; else
    ArtifactRejected('missing-file'). Never blocks on a FIFO and never reads a device (``/dev/zero``
    would copy without end): what is checked is the file actually opened (fstat), not the name."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ArtifactRejected("missing-file", f"{path.name} not found in {path.parent}") from None
    except OSError as exc:
        raise ArtifactRejected("missing-file", f"{path.name} in {path.parent} cannot be read: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ArtifactRejected("missing-file", f"{path.name} in {path.parent} is not a regular file")
        yield fd, info.st_size
    finally:
        os.close(fd)


def _read_limited(fd: int, limit: int) -> bytes:
    """At most ``limit + 1`` bytes from ``fd`` (one more than allowed tells the caller it is too long)."""
    parts, left = [], limit + 1
    while left > 0:
        try:
            block = os.read(fd, min(left, COPY_BLOCK))
        except OSError as exc:
            raise ArtifactRejected("missing-file", f"read failed: {exc.strerror}") from None
        if not block:
            break
        parts.append(block)
        left -= len(block)
    return b"".join(parts)


def _read_small(path: Path, limit: int) -> bytes:
    with open_regular(path) as (fd, _):
        data = _read_limited(fd, limit)
    if len(data) > limit:
        raise ArtifactRejected("too-large", f"{path.name} is over {limit} bytes")
    return data


def iter_chunks(path: Path, chunk_size: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_size)
            if not block:
                return
            yield block


def describe_file(path: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> FileEntry:
    """Size, sha256 and per-chunk sha256 of one file (an empty file has one empty chunk)."""
    whole = hashlib.sha256()
    chunks = []
    for block in iter_chunks(path, chunk_size):
        whole.update(block)
        chunks.append(sha256_hex(block))
    return FileEntry(
        path=path.name,
        size=path.stat().st_size,
        sha256=whole.hexdigest(),
        chunks=tuple(chunks) or (sha256_hex(b""),),
    )


def seal(
    directory: Path, fields: dict[str, Any], key: Ed25519PrivateKey, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Manifest:
    """Describe every payload file in ``directory``, then write a signed manifest next to them.

    ``fields`` holds every manifest field except ``files`` and ``chunk_size``.
    """
    payload = sorted(p for p in directory.iterdir() if p.is_file() and p.name not in RESERVED)
    document = dict(fields, files=[describe_file(p, chunk_size) for p in payload], chunk_size=chunk_size)
    manifest = manifest_from_wire({**_plain(document), "schema": SCHEMA})
    wire = manifest.to_wire()
    atomic_write_bytes(directory / MANIFEST_FILE, json.dumps(wire, indent=2, sort_keys=True).encode())
    atomic_write_bytes(directory / SIGNATURE_FILE, json.dumps(sign_document(wire, key)).encode())
    return manifest


def _plain(value: Any) -> Any:
    if isinstance(value, FileEntry):
        return {"path": value.path, "size": value.size, "sha256": value.sha256, "chunks": list(value.chunks)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def load_signed_manifest(manifest_bytes: bytes, signature_bytes: bytes, trust: TrustStore) -> Manifest:
    """Check the signature over the manifest document first, then its schema."""
    try:
        document, signature = strict_loads(manifest_bytes), strict_loads(signature_bytes)
    except (ValueError, RecursionError) as exc:  # (UnicodeDecodeError is a ValueError)
        raise ArtifactRejected("manifest", f"not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ArtifactRejected("manifest", "manifest is not a JSON object")
    verify_document(document, signature, trust)
    return manifest_from_wire(document)


@dataclass(frozen=True)
class SignedManifest:
    """A verified manifest with the exact bytes it was parsed from: the bytes a store keeps."""

    manifest: Manifest
    manifest_bytes: bytes
    signature_bytes: bytes


def read_signed(directory: Path, trust: TrustStore) -> SignedManifest:
    """Read ``manifest.json`` and ``signature`` once, into memory, and verify those bytes."""
    manifest_bytes = _read_small(directory / MANIFEST_FILE, MAX_MANIFEST_BYTES)
    signature_bytes = _read_small(directory / SIGNATURE_FILE, MAX_SIGNATURE_BYTES)
    return SignedManifest(load_signed_manifest(manifest_bytes, signature_bytes, trust), manifest_bytes, signature_bytes)


def stage_verified(
    source: Path, signed: SignedManifest, staging: Path, copied: Callable[[], None] = lambda: None
) -> None:
    """Copy the payload files into ``staging``, verify them there, and write the manifest and signature
    from the verified bytes in memory: what ends up in ``staging`` is exactly what was verified (a file
    swapped on the source during the checks never lands). ``copied`` runs between copy and verify."""
    for entry in signed.manifest.files:
        _copy_bounded(source / entry.path, staging / entry.path, entry)
    copied()
    verify_files(staging, signed.manifest)
    (staging / MANIFEST_FILE).write_bytes(signed.manifest_bytes)
    (staging / SIGNATURE_FILE).write_bytes(signed.signature_bytes)


def _copy_bounded(source: Path, target: Path, entry: FileEntry) -> None:
    """Copy a regular file of at most ``entry.size`` bytes (a longer one is refused as soon as it
    passes the size, so a huge or endless file never fills the disk)."""
    with open_regular(source) as (fd, size):
        if size != entry.size:
            raise ArtifactRejected("size", f"{entry.path} is {size} bytes, manifest says {entry.size}")
        copied = 0
        with open(target, "xb") as out:
            while block := _read_limited(fd, COPY_BLOCK - 1):
                copied += len(block)
                if copied > entry.size:
                    raise ArtifactRejected("size", f"{entry.path} grew past the {entry.size} bytes the manifest says")
                out.write(block)


def read_manifest(directory: Path, trust: TrustStore) -> Manifest:
    return read_signed(directory, trust).manifest


def verify_chunk(manifest: Manifest, file_index: int, chunk_index: int, data: bytes) -> None:
    try:
        expected = manifest.files[file_index].chunks[chunk_index]
    except IndexError:
        raise ArtifactRejected("chunk", f"no chunk {file_index}/{chunk_index} in the manifest") from None
    if sha256_hex(data) != expected:
        raise ArtifactRejected("chunk", f"chunk {chunk_index} of {manifest.files[file_index].path} has a wrong sha256")


def verify_files(directory: Path, manifest: Manifest) -> None:
    """Every listed file exists with the right size, whole-file sha256 and chunk sha256 values."""
    for index, entry in enumerate(manifest.files):
        with open_regular(directory / entry.path) as (fd, size):
            if size != entry.size:
                raise ArtifactRejected("size", f"{entry.path} is {size} bytes, manifest says {entry.size}")
            whole, read = hashlib.sha256(), 0
            for chunk_index in range(len(entry.chunks) + 1):
                block = _read_limited(fd, manifest.chunk_size - 1)
                if not block and chunk_index:
                    break
                verify_chunk(manifest, index, chunk_index, block)
                whole.update(block)
                read += len(block)
        if read != entry.size or whole.hexdigest() != entry.sha256:
            raise ArtifactRejected("sha256", f"{entry.path} has a wrong sha256")


def check_freshness(manifest: Manifest, installed_release: int | None, now: datetime | None = None) -> None:
    """Refuse an expired manifest or one whose release is not above the installed one."""
    if manifest.is_expired(now):
        raise ArtifactRejected("expired", f"{manifest.name}@{manifest.version} expired at {manifest.expires_at}")
    if installed_release is not None and manifest.release <= installed_release:
        raise ArtifactRejected(
            "downgrade",
            f"{manifest.name}@{manifest.version} has release {manifest.release}, "
            f"not above the installed release {installed_release}",
        )


def read_chunk(directory: Path, manifest: Manifest, file_index: int, chunk_index: int) -> bytes:
    entry = manifest.files[file_index]
    with open(directory / entry.path, "rb") as f:
        f.seek(chunk_index * manifest.chunk_size)
        return f.read(manifest.chunk_size)
