"""Detect which profile matches the running device, with the reasons for the choice."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from device_profiles.loader import DeviceProfile

DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
TEGRA_RELEASE = Path("/etc/nv_tegra_release")
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class HostFacts:
    """What the detector read off the machine."""

    arch: str
    cpu_cores: int
    cpu_flags: frozenset[str]
    device_tree_model: str = ""
    is_jetson: bool = False
    gpu_compute_capability: str | None = None
    gpu_name: str | None = None


@dataclass(frozen=True)
class Detection:
    profile: DeviceProfile
    score: int
    reasons: tuple[str, ...] = field(default_factory=tuple)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").replace("\x00", "").strip()
    except OSError:
        return ""


def _cpu_flags(cpuinfo: str) -> frozenset[str]:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def _nvidia_smi() -> tuple[str | None, str | None]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    first = out.strip().splitlines()[0] if out.strip() else ""
    name, _, capability = first.partition(",")
    return (name.strip() or None), (capability.strip() or None)


def read_host() -> HostFacts:
    """Read the facts detection needs from this machine (no side effects)."""
    model = _read(DEVICE_TREE_MODEL)
    is_jetson = TEGRA_RELEASE.exists() or "jetson" in model.lower()
    gpu_name, capability = _nvidia_smi()
    return HostFacts(
        arch=platform.machine().lower().replace("arm64", "aarch64").replace("amd64", "x86_64"),
        cpu_cores=os.cpu_count() or 1,
        cpu_flags=_cpu_flags(_read(CPUINFO)),
        device_tree_model=model,
        is_jetson=is_jetson,
        gpu_compute_capability=capability,
        gpu_name=gpu_name,
    )


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def score_profile(profile: DeviceProfile, host: HostFacts) -> Detection | None:
    """None when the profile cannot describe this host; otherwise a score and the reasons."""
    if profile.arch != host.arch:
        return None
    reasons = [f"arch {host.arch}"]
    score = 1
    if profile.accelerator == "nvidia-jetson":
        if not host.is_jetson:
            return None
        reasons.append("Jetson (nv_tegra_release or device tree)")
        score += 10
    elif profile.accelerator == "nvidia-gpu":
        if host.gpu_compute_capability is None or profile.gpu_compute_capability is None:
            return None
        if _version_tuple(host.gpu_compute_capability) < _version_tuple(profile.gpu_compute_capability):
            return None
        reasons.append(f"GPU {host.gpu_name} compute capability {host.gpu_compute_capability} (nvidia-smi)")
        score += 10
    elif host.is_jetson:
        return None
    if profile.detect.device_tree_model:
        hits = [m for m in profile.detect.device_tree_model if m.lower() in host.device_tree_model.lower()]
        if not hits:
            return None
        reasons.append(f"device tree model {host.device_tree_model!r}")
        score += 20
    missing = set(profile.cpu_flags) - host.cpu_flags
    if missing:
        return None
    if profile.cpu_flags:
        reasons.append(f"CPU flags {', '.join(profile.cpu_flags)}")
        score += len(profile.cpu_flags)
    if profile.detect.min_cpu_cores:
        if host.cpu_cores < profile.detect.min_cpu_cores:
            return None
        reasons.append(f"{host.cpu_cores} cores >= {profile.detect.min_cpu_cores}")
        score += 1
    return Detection(profile=profile, score=score, reasons=tuple(reasons))


def detect_profile(profiles: dict[str, DeviceProfile], host: HostFacts | None = None) -> Detection | None:
    """The best-matching profile for ``host`` (default: this machine), or None when none fits."""
    host = host or read_host()
    matches = [d for d in (score_profile(p, host) for p in profiles.values()) if d is not None]
    if not matches:
        return None
    return max(matches, key=lambda d: (d.score, d.profile.id))
