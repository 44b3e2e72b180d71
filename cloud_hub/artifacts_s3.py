"""Artifacts on S3-compatible object storage (``cloud-hub serve --artifacts s3://bucket/prefix``).

The bucket is the source of truth: an artifact is the objects ``prefix/{artifact_id}/{file}``. ``add``
verifies the offer exactly as the local store does (``read_signed``, ``stage_verified`` into a local
staging directory) and uploads those verified bytes, ``manifest.json`` last: an artifact is visible
(``ids``, ``path``, ``signature``) only once its manifest is there, so an upload that dies halfway
leaves stray payload objects but never a complete-looking artifact (the next ``add`` overwrites them).

Reads are checked again, because the bucket is not this process's disk: ``path`` downloads an artifact
once into a local read-through cache (``STATE/artifact-cache/{artifact_id}/``: to a temporary directory,
checked against the manifest, whose sha256 must be the artifact id, then renamed into place, so a crash
never leaves a partial copy there), and ``read_chunk`` serves a chunk from that cache or with a ranged
GET, refused when its sha256 is not the manifest's. The cache only grows with the artifacts the hub
serves; removing it (hub stopped) is always safe.

The client has bounded timeouts and retries (``client_config``); credentials and the region come from
boto3's standard chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_REGION, ~/.aws, an instance
role), the endpoint of an S3-compatible server from ``--s3-endpoint`` (EDGEFED_S3_ENDPOINT).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cloud_hub.artifacts import MAX_UPLOAD_BYTES, unpack_tar
from edge_agent.errors import ConfigError
from edge_agent.protocol.artifact import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    SIGNATURE_FILE,
    check_freshness,
    read_chunk,
    read_signed,
    stage_verified,
    verify_chunk,
    verify_files,
)
from edge_agent.protocol.atomic import publish_dir
from edge_agent.protocol.canonical import strict_loads
from edge_agent.protocol.errors import ArtifactRejected
from edge_agent.protocol.manifest import Manifest, manifest_from_wire
from edge_agent.protocol.signing import TrustStore

S3_ENDPOINT_ENV, S3_REGION_ENV = "EDGEFED_S3_ENDPOINT", "EDGEFED_S3_REGION"
CONNECT_TIMEOUT_S, READ_TIMEOUT_S, MAX_ATTEMPTS = 5.0, 30.0, 4
STALE_STAGING_S = 3600.0  # a download directory this old is a crashed one (other processes share the cache)
BLOCK = 1 << 20
_MISSING = ("NoSuchKey", "404", "NotFound")


class StorageUnavailable(OSError):
    """The object store could not be reached or refused a request (after the client's retries)."""


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → ("bucket", "some/prefix"); ConfigError naming the flag otherwise."""
    if not url.startswith("s3://"):
        raise ConfigError(f"--artifacts {url}: an S3 location is s3://BUCKET or s3://BUCKET/PREFIX")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket or any(c in bucket for c in " \\?#"):
        raise ConfigError(f"--artifacts {url}: no valid bucket name; write s3://BUCKET/PREFIX")
    return bucket, prefix.strip("/")


def client_config(endpoint: str | None, region: str | None) -> Any:
    """botocore Config: bounded connect/read timeouts and retries; path-style addressing for a custom
    endpoint (MinIO, Ceph, moto: most S3-compatible servers do not serve bucket subdomains)."""
    from botocore.config import Config

    return Config(region_name=region, connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                  retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
                  s3={"addressing_style": "path"} if endpoint else None)  # fmt: skip


def make_client(endpoint: str | None, region: str | None) -> Any:
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=endpoint or None,
                                          config=client_config(endpoint, region))  # fmt: skip


def _missing(exc: BaseException) -> bool:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")) in _MISSING


class S3ArtifactStore:
    """The ``Artifacts`` interface (cloud_hub/artifacts.py) on a bucket, with a local read-through cache."""

    def __init__(self, url: str, trust: TrustStore, cache_dir: Path, endpoint: str | None = None,
                 region: str | None = None, client: Any = None) -> None:  # fmt: skip
        self.url, self.trust, self.cache, self.endpoint = url, trust, cache_dir, endpoint
        self.bucket, self.prefix = parse_s3_url(url)
        self.client = client if client is not None else make_client(endpoint, region)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        cache_dir.mkdir(parents=True, exist_ok=True)
        self._sweep()
        self._check_bucket()

    # --- object access ---------------------------------------------------------------------------------
    def key(self, artifact_id: str, name: str) -> str:
        return f"{self.prefix}/{artifact_id}/{name}" if self.prefix else f"{artifact_id}/{name}"

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as exc:
            raise StorageUnavailable(f"object store {self.endpoint or 'AWS S3'} bucket {self.bucket}: "
                                     f"{what} failed: {exc}") from None  # fmt: skip

    def _check_bucket(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise ConfigError(f"--artifacts {self.url}: cannot use bucket {self.bucket!r} at "
                              f"{self.endpoint or 'AWS S3'} ({exc}); check that it exists, the credentials "
                              "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws) and --s3-endpoint"
                              ) from None  # fmt: skip

    def _get(self, key: str, limit: int, byte_range: str | None = None) -> bytes | None:
        """The object's bytes (at most ``limit``: a larger one is ArtifactRejected('size')); None when absent."""
        from botocore.exceptions import ClientError

        extra = {"Range": byte_range} if byte_range else {}
        with self._errors(f"GET {key}"):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=key, **extra)["Body"]
            except ClientError as exc:
                if _missing(exc):
                    return None
                raise
            with body:
                data = body.read(limit + 1)
        if len(data) > limit:
            raise ArtifactRejected("size", f"{key} holds more than the {limit} bytes expected")
        return bytes(data)

    def _fetch(self, key: str, target: Path, size: int) -> None:
        """Download one payload object to ``target`` in blocks, refused once it passes ``size`` bytes."""
        from botocore.exceptions import ClientError

        with self._errors(f"GET {key}"):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            except ClientError as exc:
                if _missing(exc):
                    raise ArtifactRejected("missing-file", f"{key} is missing from the bucket") from None
                raise
            with body, target.open("xb") as out:
                written = 0
                while block := body.read(BLOCK):
                    written += len(block)
                    if written > size:
                        raise ArtifactRejected("size", f"{key} is larger than the {size} bytes its manifest says")
                    out.write(block)

    def _put(self, key: str, path: Path) -> None:
        with self._errors(f"PUT {key}"):
            self.client.upload_file(str(path), self.bucket, key)

    # --- the Artifacts interface ------------------------------------------------------------------------
    def add(self, source: Path) -> Manifest:
        """Verify ``source`` with the trusted keys, then upload the verified bytes (manifest last); adding
        it again re-uploads a stored copy that no longer verifies."""
        signed = read_signed(source, self.trust)
        manifest = signed.manifest
        check_freshness(manifest, installed_release=None)
        with tempfile.TemporaryDirectory(dir=self.cache, prefix=".staging-") as tmp:
            staging = Path(tmp) / "artifact"
            staging.mkdir()
            stage_verified(source, signed, staging)  # (a corrupted offer is refused even when a copy is stored)
            if self._stored_intact(manifest):
                return manifest
            for entry in manifest.files:
                self._put(self.key(manifest.artifact_id, entry.path), staging / entry.path)
            self._put(self.key(manifest.artifact_id, SIGNATURE_FILE), staging / SIGNATURE_FILE)
            self._put(self.key(manifest.artifact_id, MANIFEST_FILE), staging / MANIFEST_FILE)  # visible from here
        return manifest

    def _stored_intact(self, manifest: Manifest) -> bool:
        """Whether the bucket holds this artifact whole and intact (downloaded anew and checked); a cached
        copy that no longer verifies (local disk rot) is dropped."""
        cached = self.cache / manifest.artifact_id
        if cached.is_dir():
            try:
                verify_files(cached, manifest)
            except ArtifactRejected:
                self._drop_cache(manifest.artifact_id)
        with tempfile.TemporaryDirectory(dir=self.cache, prefix=".check-") as tmp:
            try:
                return self._download(manifest.artifact_id, Path(tmp) / "artifact")
            except ArtifactRejected:
                return False

    def add_tar(self, tar_path: Path, max_bytes: int = MAX_UPLOAD_BYTES) -> Manifest:
        with tempfile.TemporaryDirectory(dir=self.cache, prefix=".upload-") as tmp:
            unpack_tar(tar_path, Path(tmp), max_bytes)
            return self.add(Path(tmp))

    def path(self, artifact_id: str) -> Path:
        """The cached copy, downloaded and checked on first use; absent when the bucket has no such artifact."""
        final = self.cache / artifact_id
        if final.is_dir():  # only ever a whole, checked copy (renamed into place)
            return final
        with self._lock_for(artifact_id):
            if not final.is_dir():
                self._download(artifact_id, final)
        return final

    def ids(self) -> list[str]:
        found: list[str] = []
        start = f"{self.prefix}/" if self.prefix else ""
        with self._errors(f"LIST {start}"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                for item in page.get("Contents", []):
                    artifact_id, _, name = str(item["Key"])[len(start) :].partition("/")
                    if name == MANIFEST_FILE:
                        found.append(artifact_id)
        return sorted(found)

    def discard(self, artifact_id: str) -> None:
        """Remove the manifest first (the artifact stops being visible), then the rest, then the cache."""
        keys = [self.key(artifact_id, MANIFEST_FILE)]
        with self._errors(f"LIST {artifact_id}"):
            listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.key(artifact_id, ""))
        keys += [str(item["Key"]) for item in listed.get("Contents", []) if item["Key"] not in keys]
        with self._errors(f"DELETE {artifact_id}"):
            for key in keys:
                self.client.delete_object(Bucket=self.bucket, Key=key)
        shutil.rmtree(self.cache / artifact_id, ignore_errors=True)

    def signature(self, artifact_id: str) -> dict[str, Any]:
        """The signature record of a complete artifact (its manifest is in the bucket); FileNotFoundError if none."""
        cached = self.cache / artifact_id / SIGNATURE_FILE
        data = cached.read_bytes() if cached.is_file() else None
        if data is None and self._manifest(artifact_id) is not None:
            data = self._get(self.key(artifact_id, SIGNATURE_FILE), MAX_SIGNATURE_BYTES)
        if data is None:
            raise FileNotFoundError(f"no artifact {artifact_id} in {self.url}")
        record: dict[str, Any] = strict_loads(data)
        return record

    def read_chunk(self, manifest: Manifest, file_index: int, chunk_index: int) -> bytes:
        """One chunk from the cache, else with a ranged GET; ArtifactRejected unless its sha256 is the manifest's."""
        cached = self.cache / manifest.artifact_id
        if cached.is_dir():
            data = read_chunk(cached, manifest, file_index, chunk_index)
            try:
                verify_chunk(manifest, file_index, chunk_index, data)
                return data
            except ArtifactRejected:  # the cached copy rotted on local disk: the bucket's is read instead
                self._drop_cache(manifest.artifact_id)
        data = self._ranged(manifest, file_index, chunk_index)
        verify_chunk(manifest, file_index, chunk_index, data)
        return data

    # --- helpers ----------------------------------------------------------------------------------------
    def _ranged(self, manifest: Manifest, file_index: int, chunk_index: int) -> bytes:
        if not 0 <= file_index < len(manifest.files) or chunk_index < 0:
            raise ArtifactRejected("chunk", f"no chunk {file_index}/{chunk_index} in the manifest")
        entry = manifest.files[file_index]
        start = chunk_index * manifest.chunk_size
        if start >= entry.size:
            return b""  # (an empty file's one chunk; past the end verify_chunk refuses the index)
        end = min(entry.size, start + manifest.chunk_size) - 1
        data = self._get(self.key(manifest.artifact_id, entry.path), end - start + 1, f"bytes={start}-{end}")
        if data is None:
            raise ArtifactRejected("missing-file", f"{entry.path} of {manifest.artifact_id} is missing from the bucket")
        return data

    def _manifest(self, artifact_id: str) -> tuple[Manifest, bytes] | None:
        """The stored manifest and its bytes, refused unless its sha256 is ``artifact_id``; None when absent."""
        data = self._get(self.key(artifact_id, MANIFEST_FILE), MAX_MANIFEST_BYTES)
        if data is None:
            return None
        try:
            manifest = manifest_from_wire(strict_loads(data))
        except (ValueError, RecursionError) as exc:
            raise ArtifactRejected("manifest", f"stored manifest of {artifact_id} is not valid JSON: {exc}") from None
        if manifest.artifact_id != artifact_id:
            raise ArtifactRejected("manifest", f"stored manifest of {artifact_id} has another id (altered)")
        return manifest, data

    def _download(self, artifact_id: str, final: Path) -> bool:
        """Download, check and rename into ``final``; False when the bucket has no such (complete) artifact."""
        found = self._manifest(artifact_id)
        if found is None:
            return False
        manifest, manifest_bytes = found
        signature = self._get(self.key(artifact_id, SIGNATURE_FILE), MAX_SIGNATURE_BYTES)
        if signature is None:
            raise ArtifactRejected("missing-file", f"{SIGNATURE_FILE} of {artifact_id} is missing from the bucket")
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=self.cache))
        try:
            for entry in manifest.files:
                self._fetch(self.key(artifact_id, entry.path), staging / entry.path, entry.size)
            verify_files(staging, manifest)
            (staging / MANIFEST_FILE).write_bytes(manifest_bytes)
            (staging / SIGNATURE_FILE).write_bytes(signature)
            staging.chmod(0o755)
            publish_dir(staging, final)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not final.is_dir():  # (else another process published the same checked copy first)
                raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return True

    def _drop_cache(self, artifact_id: str) -> None:
        """Move a cached copy out of the way at once (renamed), then remove it."""
        try:
            (self.cache / artifact_id).rename(self.cache / f".corrupt-{artifact_id}-{time.monotonic_ns()}")
        except OSError:
            return
        self._sweep(max_age_s=0.0, prefix=".corrupt-")

    def _lock_for(self, artifact_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(artifact_id, threading.Lock())

    def _sweep(self, max_age_s: float = STALE_STAGING_S, prefix: str = ".") -> None:
        """Remove download/staging directories left by a crash (old ones only: other processes share the cache)."""
        cutoff = time.time() - max_age_s
        for entry in self.cache.glob(f"{prefix}*-*"):
            try:
                if entry.is_dir() and entry.stat().st_mtime <= cutoff:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                continue
