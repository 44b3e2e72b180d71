"""The on-disk model store: versions side by side and an atomically switched active pointer.

    models/{name}/versions/{version}/   a verified artifact (manifest.json, signature, payload files)
    models/{name}/active.json           {"version", "artifact_id", "release", "previous"}
    models/.lock                        flock: exclusive for writers, shared for readers loading a version

Nothing is written before an artifact passes every check, a version directory appears only by an
atomic rename of a complete staging directory, and the active pointer changes by write-fsync-rename,
so a crash at any point leaves the previous state intact.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from device_profiles import DeviceProfile
from edge_agent.errors import StoreError
from edge_agent.protocol.artifact import MANIFEST_FILE, RESERVED, check_freshness, read_manifest, verify_files
from edge_agent.protocol.atomic import atomic_write_bytes, publish_dir
from edge_agent.protocol.errors import ArtifactRejected
from edge_agent.protocol.manifest import Manifest, manifest_from_wire
from edge_agent.protocol.signing import TrustStore

RETAIN_VERSIONS = 3


@dataclass(frozen=True)
class ActiveRecord:
    version: str
    artifact_id: str
    release: int
    previous: str | None = None


def check_compatible(manifest: Manifest, profile: DeviceProfile) -> None:
    """The artifact was built for this profile, or is a CPU artifact for the same arch and runtime."""
    hw = manifest.hardware
    if hw.profile == profile.id:
        return
    if hw.accelerator == "none" and hw.arch == profile.arch and manifest.runtime in profile.runtimes:
        return
    raise ArtifactRejected(
        "profile", f"built for {hw.profile} ({hw.arch}, {hw.accelerator}), this device is {profile.id}"
    )


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def locked(self, shared: bool = False) -> Iterator[None]:
        """Exclusive for writers (install, activate, prune); ``shared`` for readers opening a version,
        so retention never deletes a version while another process is loading it."""
        with open(self.root / ".lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def model_dir(self, name: str) -> Path:
        return self.root / name

    def version_dir(self, name: str, version: str) -> Path:
        return self.root / name / "versions" / version

    def active_path(self, name: str) -> Path:
        return self.root / name / "active.json"

    def active(self, name: str) -> ActiveRecord | None:
        try:
            return ActiveRecord(**json.loads(self.active_path(name).read_text()))
        except FileNotFoundError:
            return None

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def versions(self, name: str) -> list[Manifest]:
        """Installed versions of a model, oldest release first (manifests were verified on install)."""
        base = self.root / name / "versions"
        found = [self.manifest(name, p.name) for p in base.iterdir() if p.is_dir()] if base.is_dir() else []
        return sorted(found, key=lambda m: m.release)

    def manifest(self, name: str, version: str) -> Manifest:
        path = self.version_dir(name, version) / MANIFEST_FILE
        try:
            return manifest_from_wire(json.loads(path.read_text()))
        except FileNotFoundError:
            raise StoreError(f"{name}@{version} is not installed") from None

    def install(
        self, source: Path, trust: TrustStore, profile: DeviceProfile, *, activate: bool = False,
        check: Callable[[Path, Manifest], None] | None = None,
    ) -> Manifest:  # fmt: skip
        """Verify the artifact at ``source`` and add it as a new version.

        Raises ArtifactRejected, leaving the store byte-identical, when any check fails. Installing the
        artifact that is already installed under that version is a no-op. With ``activate``, ``check``
        (given the installed directory) runs and the version becomes active under the same writer lock,
        so no other process can activate or prune in between.
        """
        manifest = read_manifest(source, trust)
        with self.locked():
            if self._installed_artifact(manifest.name, manifest.version) != manifest.artifact_id:
                check_compatible(manifest, profile)
                check_freshness(manifest, max((m.release for m in self.versions(manifest.name)), default=None))
                if manifest.total_size > profile.max_artifact_bytes:
                    raise ArtifactRejected("too-large", f"{manifest.total_size} bytes is over {profile.id}'s limit")
                verify_files(source, manifest)
                self._copy_in(source, manifest)
            if activate:
                if check is not None:
                    check(self.version_dir(manifest.name, manifest.version), manifest)
                self._activate(manifest.name, manifest.version)
        return manifest

    def _copy_in(self, source: Path, manifest: Manifest) -> None:
        final = self.version_dir(manifest.name, manifest.version)
        if final.exists():
            raise ArtifactRejected("downgrade", f"{manifest.name}@{manifest.version} is installed with other content")
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=final.parent))
        try:
            for name in [*RESERVED, *(f.path for f in manifest.files)]:
                shutil.copyfile(source / name, staging / name)
            verify_files(staging, manifest)  # what landed on our disk, not just what was offered
            publish_dir(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _installed_artifact(self, name: str, version: str) -> str | None:
        try:
            return self.manifest(name, version).artifact_id
        except StoreError:
            return None

    def activate(self, name: str, version: str) -> ActiveRecord:
        """Atomically point ``name`` at an installed ``version``; the old one becomes ``previous``."""
        with self.locked():
            return self._activate(name, version)

    def _activate(self, name: str, version: str) -> ActiveRecord:
        manifest = self.manifest(name, version)
        current = self.active(name)
        previous = current.previous if current else None
        if current is not None and current.version != version:
            previous = current.version
        record = ActiveRecord(version, manifest.artifact_id, manifest.release, previous)
        atomic_write_bytes(self.active_path(name), json.dumps(asdict(record)).encode())
        self._prune(name, keep={version, previous or ""})
        return record

    def rollback(self, name: str) -> ActiveRecord:
        current = self.active(name)
        if current is None or current.previous is None:
            raise StoreError(f"{name} has no previous version to roll back to")
        return self.activate(name, current.previous)

    def _prune(self, name: str, keep: set[str]) -> None:
        versions = self.versions(name)
        surplus = len(versions) - RETAIN_VERSIONS
        for manifest in versions:
            if surplus <= 0:
                break
            if manifest.version not in keep:
                shutil.rmtree(self.version_dir(name, manifest.version), ignore_errors=True)
                surplus -= 1
