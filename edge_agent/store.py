"""The on-disk model store: versions side by side and an atomically switched active pointer.

    models/{name}/versions/{version}/   a verified artifact (manifest.json, signature, payload files)
    models/{name}/active.json           {"version", "artifact_id", "release", "previous"}
    models/.lock                        flock: exclusive for writers, shared for readers loading a version

Nothing is written before an artifact passes every check, a version directory appears only by an
atomic rename of a complete staging directory, and the active pointer changes by write-fsync-rename,
so a crash at any point leaves the previous state intact. Every file is read once: the manifest and
signature into memory (verified, then written from memory), payload files into the staging directory
(verified there), so the bytes stored are the bytes verified. Leftover staging directories of a killed
install are removed by the next writer; a version directory that cannot be read is skipped with a
warning, never breaking installs or listings of the other versions.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from device_profiles import DeviceProfile
from edge_agent.ab import read_ab
from edge_agent.errors import StoreError
from edge_agent.protocol.artifact import (
    MANIFEST_FILE,
    SignedManifest,
    check_freshness,
    read_signed,
    stage_verified,
    verify_files,
)
from edge_agent.protocol.atomic import atomic_write_bytes, publish_dir
from edge_agent.protocol.canonical import strict_loads
from edge_agent.protocol.errors import ArtifactRejected, ProtocolError
from edge_agent.protocol.manifest import Manifest, manifest_from_wire
from edge_agent.protocol.signing import TrustStore

log = logging.getLogger(__name__)
RETAIN_VERSIONS = 3
KILL_POINT_ENV = "EDGEFED_TEST_KILL_AT"
"""Tests only: the name of an install step at which the process SIGKILLs itself (kill-point tests)."""


def kill_point(step: str) -> None:
    """Named steps of an install; a kill-point test sets ``KILL_POINT_ENV`` to die at exactly one."""
    if os.environ.get(KILL_POINT_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


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
        """Installed versions of a model, oldest release first (manifests were verified on install).

        A version directory that cannot be read is skipped with a warning; staging directories (dot
        names) are never versions."""
        base = self.root / name / "versions"
        found = []
        for path in sorted(base.iterdir()) if base.is_dir() else []:
            if not path.is_dir() or path.name.startswith("."):
                continue
            try:
                found.append(self.manifest(name, path.name))
            except StoreError as exc:
                log.warning("skipping %s: %s", path, exc)
        return sorted(found, key=lambda m: m.release)

    def manifest(self, name: str, version: str) -> Manifest:
        """The installed manifest; StoreError when the version is missing or its manifest unreadable."""
        path = self.version_dir(name, version) / MANIFEST_FILE
        try:
            return manifest_from_wire(strict_loads(path.read_bytes()))
        except FileNotFoundError:
            raise StoreError(f"{name}@{version} is not installed") from None
        except (OSError, ValueError, ProtocolError) as exc:
            raise StoreError(f"{name}@{version} has an unreadable manifest: {exc}") from None

    def install(
        self, source: Path, trust: TrustStore, profile: DeviceProfile, *, activate: bool = False,
        check: Callable[[Path, Manifest], None] | None = None, allow_release_below: bool = False,
    ) -> Manifest:  # fmt: skip
        """Verify the artifact at ``source`` and add it as a new version.

        Raises ArtifactRejected, leaving the store byte-identical, when any check fails. Installing the
        artifact that is already installed under that version is a no-op that still verifies the
        offered files and the installed copy (a damaged installed copy is replaced by the verified
        offered one). With ``activate``, ``check`` (given the installed directory) runs and the version
        becomes active under the same writer lock, so no other process can activate or prune in between.
        ``allow_release_below`` (only for a rollback the hub signed, docs/security.md) lifts the downgrade
        check: a release below the installed ones is accepted; expiry and every other check still apply.
        """
        signed = read_signed(source, trust)
        manifest = signed.manifest
        with self.locked():
            self._clean_staging(manifest.name)
            if self._installed_artifact(manifest.name, manifest.version) == manifest.artifact_id:
                verify_files(source, manifest)  # a corrupted copy of the installed artifact is refused
                if not self._intact(manifest):
                    log.warning("%s@%s was damaged on disk: replacing it", manifest.name, manifest.version)
                    self._copy_in(source, signed, replace=True)
            else:
                check_compatible(manifest, profile)
                installed = max((m.release for m in self.versions(manifest.name)), default=None)
                check_freshness(manifest, None if allow_release_below else installed)
                if manifest.total_size > profile.max_artifact_bytes:
                    raise ArtifactRejected("too-large", f"{manifest.total_size} bytes is over {profile.id}'s limit")
                self._copy_in(source, signed)
            kill_point("published")
            if activate:
                self._check_and_activate(manifest, check)
        return manifest

    def activate_installed(self, artifact_id: str, name: str, check: Callable[[Path, Manifest], None] | None,
                           *, allow_release_below: bool = False) -> bool:  # fmt: skip
        """Activate the already installed version holding ``artifact_id`` (an install finished before a
        crash, or its activation was interrupted): verify the installed copy, run ``check``, switch.

        Only a release above the active one qualifies (an interrupted upgrade; an older installed
        release stays subject to the downgrade check, unless ``allow_release_below``: a rollback the hub
        signed, which activates any other installed release). False when no such intact copy is installed (a
        damaged, inactive copy is removed so it can be fetched again); exceptions from ``check``
        propagate and leave the active pointer as it was."""
        with self.locked():
            self._clean_staging(name)
            manifest = next((m for m in self.versions(name) if m.artifact_id == artifact_id), None)
            active = self.active(name)
            if manifest is None or (active is not None and active.artifact_id == artifact_id):
                return False
            if active is not None and manifest.release <= active.release and not allow_release_below:
                return False
            if not self._intact(manifest):
                if active is None or active.version != manifest.version:
                    log.warning("%s@%s is damaged on disk: removing it", name, manifest.version)
                    self._remove_version(name, manifest.version)
                return False
            self._check_and_activate(manifest, check)
            return True

    def _check_and_activate(self, manifest: Manifest, check: Callable[[Path, Manifest], None] | None) -> None:
        if check is not None:
            check(self.version_dir(manifest.name, manifest.version), manifest)
        kill_point("checked")
        self._activate(manifest.name, manifest.version)
        kill_point("activated")

    def _intact(self, manifest: Manifest) -> bool:
        try:
            verify_files(self.version_dir(manifest.name, manifest.version), manifest)
        except ArtifactRejected:
            return False
        return True

    def _copy_in(self, source: Path, signed: SignedManifest, *, replace: bool = False) -> None:
        """Copy the payload into a staging directory, verify it there, write the manifest and signature
        from the verified bytes in memory, and publish with one rename."""
        manifest = signed.manifest
        final = self.version_dir(manifest.name, manifest.version)
        if final.exists() and not replace:
            if self._installed_artifact(manifest.name, manifest.version) is not None:
                detail = f"{manifest.name}@{manifest.version} is installed with other content"
                raise ArtifactRejected("downgrade", detail)
            log.warning("%s is unreadable: replacing it", final)
            replace = True
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=final.parent))
        try:
            stage_verified(source, signed, staging, copied=lambda: kill_point("staging"))
            kill_point("staged")
            if replace:
                self._remove_version(manifest.name, manifest.version)
            publish_dir(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _remove_version(self, name: str, version: str) -> None:
        """Rename aside first (one atomic step), then delete: a crash never leaves half a version."""
        final = self.version_dir(name, version)
        trash = Path(tempfile.mkdtemp(prefix=f".removed-{version}-", dir=final.parent))
        os.rename(final, trash / version)
        shutil.rmtree(trash, ignore_errors=True)

    def _clean_staging(self, name: str) -> None:
        """Remove what a killed writer left behind (called under the writer lock)."""
        base = self.root / name / "versions"
        for path in base.iterdir() if base.is_dir() else []:
            if path.name.startswith("."):
                shutil.rmtree(path, ignore_errors=True)

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
        ab = read_ab(self, name)  # the B side of an A/B test stays installed (ab.py)
        self._prune(name, keep={version, previous or "", ab.b if ab else ""})
        return record

    def rollback(self, name: str) -> ActiveRecord:
        """Activate the newest installed release below the active one, after verifying its files: run
        again, it goes further back (never forward to the version it just left)."""
        with self.locked():
            current = self.active(name)
            if current is None:
                raise StoreError(f"{name} has no active version to roll back from; see 'edge-agent models'")
            older = [m for m in self.versions(name) if m.release < current.release]
            if not older:
                raise StoreError(f"{name}@{current.version} (release {current.release}) is the oldest installed "
                                 "version: nothing below it to roll back to")  # fmt: skip
            target = older[-1]
            if not self._intact(target):
                raise StoreError(f"{name}@{target.version} is damaged on disk: not activated; install it again")
            return self._activate(name, target.version)

    def _prune(self, name: str, keep: set[str]) -> None:
        versions = self.versions(name)
        surplus = len(versions) - RETAIN_VERSIONS
        for manifest in versions:
            if surplus <= 0:
                break
            if manifest.version not in keep:
                self._remove_version(name, manifest.version)
                surplus -= 1
