"""The artifact store contract (cloud_hub/artifacts.py ``Artifacts``) as one test class: every storage
implementation (the local directory, S3-compatible object storage) subclasses it and provides the
``store`` fixture and ``corrupt`` (rot one stored file, as a disk or a bucket might)."""

from __future__ import annotations

import os
import tarfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import make_artifact

from edge_agent.protocol.artifact import read_manifest, verify_files
from edge_agent.protocol.errors import ArtifactRejected
from edge_agent.protocol.signing import TrustStore, generate_keypair


def tar_of(directory: Path, tar_path: Path) -> Path:
    with tarfile.open(tar_path, "w") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=path.name)
    return tar_path


def file_chunks(directory: Path, manifest: Any) -> dict[tuple[int, int], bytes]:
    """Every chunk of the artifact directory, as (file index, chunk index) → bytes."""
    found = {}
    for f, entry in enumerate(manifest.files):
        data = (directory / entry.path).read_bytes()
        for c in range(len(entry.chunks)):
            found[(f, c)] = data[c * manifest.chunk_size : (c + 1) * manifest.chunk_size]
    return found


class ArtifactStoreContract:
    store: Any

    def corrupt(self, artifact_id: str, name: str) -> None:
        """Flip one byte of a stored file (the backend's own copy, not a cache)."""
        raise NotImplementedError

    def test_add_stores_the_verified_files(self, tmp_path: Path, keys: tuple[Path, Path]) -> None:
        artifact = make_artifact(tmp_path / "a", keys[0])
        manifest = self.store.add(artifact)
        assert manifest == read_manifest(artifact, TrustStore.from_dir(keys[1].parent))
        assert self.store.ids() == [manifest.artifact_id]
        stored = self.store.path(manifest.artifact_id)
        verify_files(stored, manifest)
        assert (stored / "manifest.json").read_bytes() == (artifact / "manifest.json").read_bytes()
        assert self.store.signature(manifest.artifact_id) == read_json(artifact / "signature")

    def test_chunks_read_back_as_sealed(self, tmp_path: Path, keys: tuple[Path, Path]) -> None:
        artifact = make_artifact(tmp_path / "a", keys[0], chunk_size=1000)
        manifest = self.store.add(artifact)
        expected = file_chunks(artifact, manifest)
        assert len(expected) > 3
        for (f, c), data in expected.items():
            assert self.store.read_chunk(manifest, f, c) == data
        with pytest.raises(ArtifactRejected):
            self.store.read_chunk(manifest, 0, len(manifest.files[0].chunks))

    def test_adding_again_is_idempotent_and_still_checks_the_offer(self, tmp_path: Path,
                                                                   keys: tuple[Path, Path]) -> None:  # fmt: skip
        artifact = make_artifact(tmp_path / "a", keys[0])
        first = self.store.add(artifact)
        assert self.store.add(artifact) == first and self.store.ids() == [first.artifact_id]
        data = bytearray((artifact / "model.onnx").read_bytes())
        data[100] ^= 0xFF
        (artifact / "model.onnx").write_bytes(bytes(data))
        with pytest.raises(ArtifactRejected):
            self.store.add(artifact)
        verify_files(self.store.path(first.artifact_id), first)  # the stored copy is untouched

    def test_refusals_store_nothing(self, tmp_path: Path, keys: tuple[Path, Path]) -> None:
        stranger = generate_keypair(tmp_path / "stranger")
        expired = make_artifact(tmp_path / "old", keys[0], expires_in=timedelta(seconds=-1))
        unknown = make_artifact(tmp_path / "unknown", stranger[0])
        tampered = make_artifact(tmp_path / "tampered", keys[0])
        (tampered / "model.onnx").write_bytes((tampered / "model.onnx").read_bytes()[:-1] + b"\0")
        for artifact, reason in ((expired, "expired"), (unknown, "signature"), (tampered, "chunk")):
            with pytest.raises(ArtifactRejected) as caught:
                self.store.add(artifact)
            assert caught.value.reason == reason, artifact
        assert self.store.ids() == []

    def test_add_tar_and_its_member_checks(self, tmp_path: Path, keys: tuple[Path, Path]) -> None:
        artifact = make_artifact(tmp_path / "a", keys[0])
        manifest = self.store.add_tar(tar_of(artifact, tmp_path / "a.tar"))
        assert self.store.ids() == [manifest.artifact_id]
        os.symlink("/etc/passwd", tmp_path / "link")
        with tarfile.open(tmp_path / "bad.tar", "w") as tar:
            tar.add(tmp_path / "link", arcname="model.onnx")
        with pytest.raises(ArtifactRejected):
            self.store.add_tar(tmp_path / "bad.tar")
        with pytest.raises(ArtifactRejected):
            self.store.add_tar(tar_of(artifact, tmp_path / "a2.tar"), max_bytes=100)
        assert self.store.ids() == [manifest.artifact_id]

    def test_discard_removes_the_artifact(self, tmp_path: Path, keys: tuple[Path, Path]) -> None:
        manifest = self.store.add(make_artifact(tmp_path / "a", keys[0]))
        self.store.path(manifest.artifact_id)
        self.store.discard(manifest.artifact_id)
        assert self.store.ids() == [] and not self.store.path(manifest.artifact_id).exists()
        with pytest.raises(FileNotFoundError):
            self.store.signature(manifest.artifact_id)

    def test_a_rotted_stored_chunk_is_refused_and_adding_again_repairs_it(self, tmp_path: Path,
                                                                          keys: tuple[Path, Path]) -> None:  # fmt: skip
        artifact = make_artifact(tmp_path / "a", keys[0])
        manifest = self.store.add(artifact)
        self.corrupt(manifest.artifact_id, "model.onnx")
        index = [e.path for e in manifest.files].index("model.onnx")
        with pytest.raises(ArtifactRejected) as caught:
            self.store.read_chunk(manifest, index, 0)
        assert caught.value.reason == "chunk"
        assert self.store.add(artifact) == manifest  # the stored copy fails its checks: replaced
        assert self.store.read_chunk(manifest, index, 0) == file_chunks(artifact, manifest)[(index, 0)]


def read_json(path: Path) -> Any:
    import json

    return json.loads(path.read_text())
