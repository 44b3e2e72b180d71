"""Typed, frozen device profiles loaded from TOML, with errors that name the file, field and fix."""

from __future__ import annotations

import functools
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROFILE_PATH_ENV = "EDGEFED_PROFILE_PATH"
ARCHES = ("x86_64", "aarch64", "armv7l")
ACCELERATORS = ("none", "nvidia-gpu", "nvidia-jetson")
RUNTIMES = ("onnxruntime", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt", "tflite")
PRECISIONS = ("fp32", "fp16", "int8")
GRAPH_OPTIMIZATIONS = ("disabled", "basic", "extended", "all")
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
_VERSION_RE = re.compile(r"^\d+(\.\d+)*$")


class ProfileError(ValueError):
    """A profile file is missing, unreadable or invalid; names the file, the field and the fix."""

    def __init__(self, file: str | Path, field_name: str, problem: str, fix: str) -> None:
        self.file, self.field, self.problem, self.fix = str(file), field_name, problem, fix
        super().__init__(f"{file}: field '{field_name}': {problem}. Fix: {fix}")


@dataclass(frozen=True)
class DetectRules:
    """Extra evidence that identifies the device class (beyond arch, CPU flags and accelerator)."""

    device_tree_model: tuple[str, ...] = ()
    min_cpu_cores: int = 0


@dataclass(frozen=True)
class DeviceProfile:
    """One device class. Field meanings are documented in docs/device-profiles.md."""

    id: str
    name: str
    arch: str
    cpu_cores: int
    memory_mb: int
    accelerator: str
    runtimes: tuple[str, ...]
    precisions: tuple[str, ...]
    latency_budget_ms: float
    max_artifact_mb: int
    cpu_flags: tuple[str, ...] = ()
    gpu_compute_capability: str | None = None
    jetpack: str | None = None
    tensorrt: str | None = None
    cuda: str | None = None
    detect: DetectRules = field(default_factory=DetectRules)
    intra_op_threads: int = 0  # 0: min(cpu_cores, the CPUs this process may use)
    graph_optimization: str = "all"
    source: str = ""

    @property
    def max_artifact_bytes(self) -> int:
        return self.max_artifact_mb * 1024 * 1024

    @property
    def has_gpu(self) -> bool:
        return self.accelerator != "none"


def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...], file: Path, fix: str) -> Any:
    if key not in data:
        raise ProfileError(file, key, "missing", fix)
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ProfileError(file, key, f"expected {names}, got {type(value).__name__} {value!r}", fix)
    return value


def _str_list(data: dict[str, Any], key: str, file: Path, allowed: Iterable[str] | None, fix: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProfileError(file, key, f"expected a list of strings, got {value!r}", fix)
    if allowed is not None:
        allowed = tuple(allowed)
        for v in value:
            if v not in allowed:
                raise ProfileError(file, key, f"unknown value {v!r}", f"use one of {', '.join(allowed)}")
    return tuple(value)


def _optional_version(data: dict[str, Any], key: str, file: Path) -> str | None:
    if key not in data:
        return None
    value = data[key]
    if not isinstance(value, str) or not _VERSION_RE.match(value):
        raise ProfileError(
            file, key, f"expected a dotted version string, got {value!r}", f'write it as "{key} = "8.7""'
        )
    return value


def _choice(data: dict[str, Any], key: str, file: Path, allowed: tuple[str, ...]) -> str:
    value = _require(data, key, str, file, f"set {key} to one of {', '.join(allowed)}")
    if value not in allowed:
        raise ProfileError(file, key, f"unknown value {value!r}", f"use one of {', '.join(allowed)}")
    return str(value)


def _positive(data: dict[str, Any], key: str, file: Path, kind: type | tuple[type, ...], example: str) -> Any:
    value = _require(data, key, kind, file, f"add '{key} = {example}'")
    if value <= 0:
        raise ProfileError(
            file, key, f"must be positive, got {value}", f"set it to a positive number such as {example}"
        )
    return value


def _threads(data: dict[str, Any], file: Path) -> int:
    value = data.get("intra_op_threads", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProfileError(
            file, "intra_op_threads", f"expected a non-negative integer, got {value!r}", "use 0 for auto"
        )
    return value


def _detect_rules(data: dict[str, Any], file: Path) -> DetectRules:
    raw = data.get("detect", {})
    if not isinstance(raw, dict):
        raise ProfileError(file, "detect", "expected a table", "write it as a [detect] section")
    unknown = set(raw) - {"device_tree_model", "min_cpu_cores"}
    if unknown:
        raise ProfileError(file, f"detect.{sorted(unknown)[0]}", "unknown field", "remove it or check the spelling")
    cores = raw.get("min_cpu_cores", 0)
    if isinstance(cores, bool) or not isinstance(cores, int) or cores < 0:
        raise ProfileError(
            file, "detect.min_cpu_cores", f"expected a non-negative integer, got {cores!r}", "use e.g. 16"
        )
    models = _str_list(raw, "device_tree_model", file, None, 'write e.g. device_tree_model = ["Raspberry Pi 5"]')
    return DetectRules(device_tree_model=models, min_cpu_cores=cores)


_KNOWN_FIELDS = {
    "id",
    "name",
    "arch",
    "cpu_cores",
    "cpu_flags",
    "memory_mb",
    "accelerator",
    "gpu_compute_capability",
    "jetpack",
    "tensorrt",
    "cuda",
    "runtimes",
    "precisions",
    "latency_budget_ms",
    "max_artifact_mb",
    "detect",
    "intra_op_threads",
    "graph_optimization",
}


def parse_profile(data: dict[str, Any], file: Path) -> DeviceProfile:
    """Validate one parsed TOML document and build the profile."""
    unknown = set(data) - _KNOWN_FIELDS
    if unknown:
        raise ProfileError(file, sorted(unknown)[0], "unknown field", "remove it or check the spelling")
    profile_id = _require(data, "id", str, file, 'add id = "my-device" (lowercase letters, digits, dashes)')
    if not _ID_RE.match(profile_id):
        raise ProfileError(file, "id", f"invalid id {profile_id!r}", "use 2-63 lowercase letters, digits and dashes")
    accelerator = _choice(data, "accelerator", file, ACCELERATORS)
    capability = _optional_version(data, "gpu_compute_capability", file)
    if accelerator != "none" and capability is None:
        raise ProfileError(file, "gpu_compute_capability", "missing for a GPU profile", 'add e.g. "8.7"')
    runtimes = _str_list(data, "runtimes", file, RUNTIMES, "list runtimes in order of preference")
    if not runtimes:
        raise ProfileError(file, "runtimes", "empty", 'list at least one runtime, e.g. ["onnxruntime"]')
    precisions = _str_list(data, "precisions", file, PRECISIONS, "list supported precisions")
    if not precisions:
        raise ProfileError(file, "precisions", "empty", 'list at least one precision, e.g. ["fp32"]')
    return DeviceProfile(
        id=profile_id,
        name=_require(data, "name", str, file, 'add name = "Human readable name"'),
        arch=_choice(data, "arch", file, ARCHES),
        cpu_cores=_positive(data, "cpu_cores", file, int, "4"),
        cpu_flags=_str_list(data, "cpu_flags", file, None, 'write e.g. cpu_flags = ["avx2"]'),
        memory_mb=_positive(data, "memory_mb", file, int, "8192"),
        accelerator=accelerator,
        gpu_compute_capability=capability,
        jetpack=_optional_version(data, "jetpack", file),
        tensorrt=_optional_version(data, "tensorrt", file),
        cuda=_optional_version(data, "cuda", file),
        runtimes=runtimes,
        precisions=precisions,
        latency_budget_ms=float(_positive(data, "latency_budget_ms", file, (int, float), "20.0")),
        max_artifact_mb=_positive(data, "max_artifact_mb", file, int, "512"),
        detect=_detect_rules(data, file),
        intra_op_threads=_threads(data, file),
        graph_optimization=_choice(
            {"graph_optimization": "all", **data}, "graph_optimization", file, GRAPH_OPTIMIZATIONS
        ),
        source=str(file),
    )


def load_profile(path: str | Path) -> DeviceProfile:
    """Load and validate one profile file (parsed again only when its size or mtime changes)."""
    file = Path(path)
    try:
        stat = file.stat()
    except FileNotFoundError:
        raise ProfileError(file, "-", "file not found", "check the path") from None
    return _load_profile(file, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _load_profile(file: Path, mtime_ns: int, size: int) -> DeviceProfile:
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProfileError(file, "-", "file not found", "check the path") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(file, "-", f"not valid TOML ({exc})", "fix the TOML syntax") from None
    profile = parse_profile(data, file)
    if profile.id != file.stem:
        raise ProfileError(file, "id", f"id {profile.id!r} differs from the file name", f"rename to {profile.id}.toml")
    return profile


def builtin_profile_dir() -> Path:
    return Path(__file__).parent / "profiles"


def _profile_dirs(extra_dirs: Iterable[str | Path]) -> list[Path]:
    dirs = [builtin_profile_dir()]
    env = os.environ.get(PROFILE_PATH_ENV, "")
    dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs += [Path(p) for p in extra_dirs]
    return dirs


def load_profiles(extra_dirs: Iterable[str | Path] = ()) -> dict[str, DeviceProfile]:
    """All profiles by id: built-in ones, then user directories (a later directory overrides an id)."""
    profiles: dict[str, DeviceProfile] = {}
    for directory in _profile_dirs(extra_dirs):
        if not directory.is_dir():
            raise ProfileError(directory, "-", "profile directory not found", f"create it or fix {PROFILE_PATH_ENV}")
        for file in sorted(directory.glob("*.toml")):
            profile = load_profile(file)
            profiles[profile.id] = profile
    return profiles


def get_profile(profile_id: str, extra_dirs: Iterable[str | Path] = ()) -> DeviceProfile:
    """One profile by id; an unknown id raises ProfileError listing the known ones."""
    profiles = load_profiles(extra_dirs)
    if profile_id not in profiles:
        known = ", ".join(sorted(profiles))
        raise ProfileError("<profiles>", "id", f"unknown profile {profile_id!r}", f"use one of: {known}")
    return profiles[profile_id]
