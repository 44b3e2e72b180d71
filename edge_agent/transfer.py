"""One artifact download: chunks verified one by one and kept on disk, so a restart or a dropped
connection resumes with only the missing chunks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from edge_agent.protocol.artifact import MANIFEST_FILE, SIGNATURE_FILE, verify_chunk
from edge_agent.protocol.atomic import atomic_write_bytes, fsync_tree
from edge_agent.protocol.manifest import Manifest
from edge_agent.store import kill_point


class Transfer:
    def __init__(self, root: Path, manifest: Manifest, document: dict[str, Any], signature: dict[str, Any]) -> None:
        self.manifest, self.document, self.signature = manifest, document, signature
        self.dir = root / manifest.artifact_id
        self.chunk_dir = self.dir / "chunks"
        self.chunk_dir.mkdir(parents=True, exist_ok=True)
        self.wanted = {(f, c) for f, entry in enumerate(manifest.files) for c in range(len(entry.chunks))}
        self.have = self._verified_on_disk()

    def _chunk_path(self, file_index: int, chunk_index: int) -> Path:
        return self.chunk_dir / f"{file_index}-{chunk_index}"

    def _verified_on_disk(self) -> set[tuple[int, int]]:
        have = set()
        for key in self.wanted:
            path = self._chunk_path(*key)
            if path.is_file():
                try:
                    verify_chunk(self.manifest, key[0], key[1], path.read_bytes())
                    have.add(key)
                except Exception:
                    path.unlink()
        return have

    @property
    def missing(self) -> list[tuple[int, int]]:
        return sorted(self.wanted - self.have)

    @property
    def complete(self) -> bool:
        return not (self.wanted - self.have)

    def add(self, file_index: int, chunk_index: int, data: bytes) -> bool:
        """Store a chunk after checking its sha256; False when it was already here."""
        if (file_index, chunk_index) in self.have:
            return False
        verify_chunk(self.manifest, file_index, chunk_index, data)
        atomic_write_bytes(self._chunk_path(file_index, chunk_index), data)
        self.have.add((file_index, chunk_index))
        kill_point(f"chunk-{len(self.have)}")  # tests: killed with that many chunks stored (a byte offset)
        return True

    def assemble(self) -> Path:
        """Join the chunks into an artifact directory (verified again by the store on install)."""
        out = self.dir / "artifact"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        for file_index, entry in enumerate(self.manifest.files):
            with open(out / entry.path, "wb") as f:
                for chunk_index in range(len(entry.chunks)):
                    f.write(self._chunk_path(file_index, chunk_index).read_bytes())
        (out / MANIFEST_FILE).write_text(json.dumps(self.document))
        (out / SIGNATURE_FILE).write_text(json.dumps(self.signature))
        fsync_tree(out)
        return out

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
