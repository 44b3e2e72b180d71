"""The rules an artifact must meet before the hub registers it: one interface and one release number
per model version, and no interface change within a semver major version unless the operator says so.

Every artifact of one ``NAME@VERSION`` (one per profile) must carry the same interface (input and
output names, dtypes, shapes, max batch) and the same release number, so an app sees one contract
whichever profile or route answers, and an agent's no-downgrade check means the same on every profile.
A new version whose interface differs from the newest registered version is refused unless its major
version number is higher (or ``allow_interface_change``); errors show the difference and the fix.
"""

from __future__ import annotations

from typing import Any

from cloud_hub.errors import Conflict
from cloud_hub.registry import Registry
from edge_agent.protocol.manifest import Interface, Manifest, interface_from_wire, semver_major


def check_registration(registry: Registry, manifest: Manifest, allow_interface_change: bool = False) -> None:
    """Raise Conflict when ``manifest`` may not join the registry; a no-op for one already registered."""
    rows = registry.artifacts(manifest.name)
    if any(r["artifact_id"] == manifest.artifact_id for r in rows):
        return
    label = f"{manifest.name}@{manifest.version}"
    siblings = [r for r in rows if r["version"] == manifest.version]
    if siblings:
        _same_version(label, manifest, siblings[0], registry)
        return
    taken = next((r for r in rows if r["release"] == manifest.release), None)
    if taken is not None:
        raise Conflict(f"{label}: release {manifest.release} already belongs to {manifest.name}@{taken['version']}; "
                       "compile with another --release (0 takes the current time)")  # fmt: skip
    previous = _previous(rows, manifest.version)
    if previous is not None and not allow_interface_change:
        _compatible_with_previous(label, manifest, previous, registry)


def _same_version(label: str, manifest: Manifest, sibling: dict[str, Any], registry: Registry) -> None:
    if sibling["release"] != manifest.release:
        raise Conflict(
            f"{label} is registered with release {sibling['release']} ({sibling['profile']}); this artifact "
            f"({manifest.hardware.profile}) has release {manifest.release}: every profile of one version shares "
            f"one release. Compile it with --release {sibling['release']} (or into the same --out directory)"
        )
    registered = _interface(registry, sibling)
    differences = registered.differences(manifest.interface)
    if differences:
        raise Conflict(
            f"{label}: the {manifest.hardware.profile} artifact's interface differs from the registered "
            f"{sibling['profile']} artifact's: {'; '.join(differences)}. All artifacts of one version must take "
            "and return the same tensors: compile every profile from the same source"
        )


def _previous(rows: list[dict[str, Any]], version: str) -> dict[str, Any] | None:
    """The newest registered version of the same major (a 1.0.1 patch after 2.0.0 is held to 1.x's
    interface); with no semver to go by, the newest version."""
    major = semver_major(version)
    if major is None:
        return rows[0] if rows else None
    same_line = [r for r in rows if semver_major(r["version"]) == major]
    older = [r for r in rows if (m := semver_major(r["version"])) is not None and m < major]
    candidates = same_line or older
    return candidates[0] if candidates else None


def _compatible_with_previous(label: str, manifest: Manifest, newest: dict[str, Any], registry: Registry) -> None:
    previous = _interface(registry, newest)
    differences = previous.differences(manifest.interface)
    old_major, new_major = semver_major(newest["version"]), semver_major(manifest.version)
    if not differences or (old_major is not None and new_major is not None and new_major > old_major):
        return
    raise Conflict(
        f"{label} changes the interface of {manifest.name}@{newest['version']}: {'; '.join(differences)}. "
        "Apps written for the old interface would break after the update: give the new version a higher major "
        "number, or register it anyway with --allow-interface-change"
    )


def _interface(registry: Registry, row: dict[str, Any]) -> Interface:
    return registered_interface(registry.artifact(row["artifact_id"])["manifest"])


def registered_interface(document: dict[str, Any]) -> Interface:
    """The interface of a stored manifest document (one from manifest/1 has no max_batch: 0)."""
    return interface_from_wire({"max_batch": 0, **document})
