"""Content-addressed artifact storage: the ``Artifacts`` interface and its local implementation,
``{root}/{artifact_id}/`` on disk (the default). ``cloud_hub/artifacts_s3.py`` implements the same interface
on S3-compatible object storage (``cloud-hub serve --artifacts s3://bucket/prefix``); ``open_artifacts``
picks one from the location.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edge_agent.protocol.artifact import (
    SIGNATURE_FILE,
    check_freshness,
    read_chunk,
    read_signed,
    stage_verified,
    verify_chunk,
    verify_files,
)
from edge_agent.protocol.atomic import publish_dir
from edge_agent.protocol.errors import ArtifactRejected
from edge_agent.protocol.manifest import Manifest
from edge_agent.protocol.signing import TrustStore

MAX_UPLOAD_BYTES = 4 * 1024**3


class Artifacts(Protocol):
    """What the hub needs of an artifact store. Only verified artifacts are stored, addressed by the
    sha256 of their manifest; whatever is read back is checked again against that manifest."""

    trust: TrustStore  # the keys ``add`` verifies with (the hub's key set replaces it on rotation)

    def add(self, source: Path) -> Manifest:
        """Verify an artifact directory and store exactly the verified bytes; ArtifactRejected otherwise."""
        ...

    def add_tar(self, tar_path: Path, max_bytes: int = MAX_UPLOAD_BYTES) -> Manifest:
        """``add`` an uploaded tar of an artifact directory (its members checked before anything expands)."""
        ...

    def path(self, artifact_id: str) -> Path:
        """A local directory holding the artifact's files (for ONNX Runtime, the drift sketch); it does not
        exist when the artifact is not stored."""
        ...

    def ids(self) -> list[str]:
        """The ids of every complete stored artifact, sorted."""
        ...

    def discard(self, artifact_id: str) -> None:
        """Remove a stored artifact (one the registry refused)."""
        ...

    def signature(self, artifact_id: str) -> dict[str, Any]:
        """The artifact's signature record."""
        ...

    def read_chunk(self, manifest: Manifest, file_index: int, chunk_index: int) -> bytes:
        """One chunk, checked against the manifest: ArtifactRejected when the stored copy has rotted."""
        ...


@dataclass(frozen=True)
class ArtifactLocation:
    """Where the hub keeps artifacts (``cloud-hub serve --artifacts``): None for ``STATE/artifacts``, a
    directory path, or ``s3://bucket/prefix`` with an optional endpoint URL (S3-compatible servers) and
    region; credentials come from boto3's standard chain (environment, ~/.aws, instance role)."""

    url: str | None = None
    s3_endpoint: str | None = None
    s3_region: str | None = None

    @property
    def is_s3(self) -> bool:
        return bool(self.url and self.url.startswith("s3://"))


def open_artifacts(location: ArtifactLocation, state_dir: Path, trust: TrustStore) -> Artifacts:
    """The store at ``location``; S3 keeps its read-through cache in ``STATE/artifact-cache``."""
    if location.is_s3:
        from cloud_hub.artifacts_s3 import S3ArtifactStore  # boto3 is imported only when S3 is used

        assert location.url is not None
        return S3ArtifactStore(location.url, trust, state_dir / "artifact-cache", location.s3_endpoint,
                               location.s3_region)  # fmt: skip
    return ArtifactStore(Path(location.url) if location.url else state_dir / "artifacts", trust)


class ArtifactStore:
    def __init__(self, root: Path, trust: TrustStore) -> None:
        self.root, self.trust = root, trust
        root.mkdir(parents=True, exist_ok=True)

    def path(self, artifact_id: str) -> Path:
        return self.root / artifact_id

    def ids(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and p.is_dir())

    def add(self, source: Path) -> Manifest:
        """Verify an artifact directory with the hub's trusted keys and store exactly the verified bytes
        under its id; adding it again replaces a stored copy that no longer verifies (disk rot)."""
        signed = read_signed(source, self.trust)
        manifest = signed.manifest
        check_freshness(manifest, installed_release=None)
        final = self.path(manifest.artifact_id)
        if final.exists():
            try:
                verify_files(final, manifest)
            except ArtifactRejected:
                corrupt = Path(tempfile.mkdtemp(prefix=".corrupt-", dir=self.root))
                final.rename(corrupt / "artifact")
                shutil.rmtree(corrupt, ignore_errors=True)
            else:
                verify_files(source, manifest)  # the stored copy is intact; a corrupted offer is still refused
                return manifest
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            stage_verified(source, signed, staging)
            staging.chmod(0o755)
            publish_dir(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return manifest

    def add_tar(self, tar_path: Path, max_bytes: int = MAX_UPLOAD_BYTES) -> Manifest:
        """Unpack an uploaded tar into a temporary directory and ``add`` it (``unpack_tar``)."""
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".upload-") as tmp:
            unpack_tar(tar_path, Path(tmp), max_bytes)
            return self.add(Path(tmp))

    def discard(self, artifact_id: str) -> None:
        """Remove a stored artifact the registry refused."""
        shutil.rmtree(self.path(artifact_id), ignore_errors=True)

    def signature(self, artifact_id: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.path(artifact_id) / SIGNATURE_FILE).read_text())
        return data

    def read_chunk(self, manifest: Manifest, file_index: int, chunk_index: int) -> bytes:
        """One chunk, checked against the manifest: ArtifactRejected when the copy on disk has rotted."""
        data = read_chunk(self.path(manifest.artifact_id), manifest, file_index, chunk_index)
        verify_chunk(manifest, file_index, chunk_index, data)
        return data


def unpack_tar(tar_path: Path, directory: Path, max_bytes: int) -> None:
    """Expand an uploaded tar's files flat into ``directory``. Every member is checked before anything is
    written (``check_tar_members``); a member is copied in blocks, never held whole."""
    try:
        with tarfile.open(tar_path) as tar:
            for member in check_tar_members(tar.getmembers(), max_bytes):
                extracted = tar.extractfile(member)
                assert extracted is not None
                with extracted, (directory / Path(member.name).name).open("xb") as out:
                    shutil.copyfileobj(extracted, out, 1 << 20)
    except tarfile.TarError as exc:
        raise ArtifactRejected("manifest", f"upload is not a tar archive: {exc}") from None
    except FileExistsError as exc:
        raise ArtifactRejected("manifest", f"upload holds {Path(str(exc.filename)).name!r} twice") from None


def check_tar_members(members: list[tarfile.TarInfo], max_bytes: int) -> list[tarfile.TarInfo]:
    """The regular files of an uploaded tar, or ArtifactRejected before anything is expanded: a link,
    device, FIFO or sparse file, a path that is absolute or climbs out (``..``), or declared sizes that
    add up to more than ``max_bytes`` (a small tar cannot expand to gigabytes)."""
    files, total = [], 0
    for member in members:
        parts = Path(member.name).parts
        if member.name.startswith(("/", "\\")) or ".." in parts:
            raise ArtifactRejected("manifest", f"upload holds {member.name!r}, a path outside the artifact")
        if member.isdir():
            continue
        if not member.isreg() or member.issparse() or member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            raise ArtifactRejected("manifest", f"upload holds {member.name!r}, not a plain file (links, devices, "
                                   "FIFOs and sparse files are refused)")  # fmt: skip
        if Path(member.name).name in ("", ".", ".."):
            raise ArtifactRejected("manifest", f"upload holds {member.name!r}, not a plain file")
        total += member.size
        if total > max_bytes:
            raise ArtifactRejected("manifest", f"upload's files declare over {max_bytes} bytes (the hub's upload "
                                   "limit); nothing was expanded")  # fmt: skip
        files.append(member)
    return files
