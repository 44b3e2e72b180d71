"""Content-addressed artifact storage on disk: ``{root}/{artifact_id}/`` holds a verified artifact.

The interface is small (``add``, ``path``, ``read_chunk``) so S3-compatible storage can replace it.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

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


class ArtifactStore:
    def __init__(self, root: Path, trust: TrustStore) -> None:
        self.root, self.trust = root, trust
        root.mkdir(parents=True, exist_ok=True)

    def path(self, artifact_id: str) -> Path:
        return self.root / artifact_id

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

    def add_tar(self, tar_path: Path) -> Manifest:
        """Unpack an uploaded tar (plain files only, no paths) into a temporary directory and ``add`` it."""
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".upload-") as tmp:
            try:
                with tarfile.open(tar_path) as tar:
                    for member in tar.getmembers():
                        name = Path(member.name).name
                        if member.isdir():
                            continue
                        if not member.isfile() or name in ("", ".", ".."):
                            raise ArtifactRejected("manifest", f"upload holds {member.name!r}, not a plain file")
                        extracted = tar.extractfile(member)
                        assert extracted is not None
                        (Path(tmp) / name).write_bytes(extracted.read())
            except tarfile.TarError as exc:
                raise ArtifactRejected("manifest", f"upload is not a tar archive: {exc}") from None
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
