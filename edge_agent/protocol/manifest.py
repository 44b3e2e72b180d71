"""The artifact manifest: schema, ``to_wire`` / ``from_wire``, and the artifact id.

The manifest binds every file of an artifact by size, sha256 and per-chunk sha256. Its canonical JSON
is what gets signed, and the sha256 of that canonical JSON is the artifact id.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from edge_agent.protocol.canonical import canonical_json, sha256_hex
from edge_agent.protocol.errors import ArtifactRejected

SCHEMA = "edgefed.manifest/2"  # /2 added max_batch: the interface is one contract per version
SCHEMA_V1 = "edgefed.manifest/1"  # still read (max_batch 0) and written back as it was, so its id holds
DEFAULT_CHUNK_SIZE = 256 * 1024
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8",
          "bool", "bytes")  # fmt: skip
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")  # \Z: "$" would let a trailing newline in
_SHA_RE = re.compile(r"^[0-9a-f]{64}\Z")
_RESERVED_FILES = ("manifest.json", "signature")  # written from the verified bytes, never payload


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: a dimension is an int, or a string naming a dynamic axis."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class Interface:
    """A model version's contract with its callers: input and output names, dtypes, shapes (a string
    names a dynamic axis) and the most rows a call may carry (0: no limit)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch: int = 0

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = json.loads(json.dumps(asdict(self)))  # tuples as JSON lists
        return wire

    def differences(self, other: Interface) -> list[str]:
        """What changes from ``self`` to ``other``, one line each (empty: the same interface)."""
        lines = []
        for role, mine, theirs in (("input", self.inputs, other.inputs), ("output", self.outputs, other.outputs)):
            old, new = {t.name: t for t in mine}, {t.name: t for t in theirs}
            changed = [f"{role} {n!r} removed" for n in old if n not in new]
            changed += [f"{role} {n!r} added ({new[n].dtype} {list(new[n].shape)})" for n in new if n not in old]
            for name in (n for n in old if n in new and old[n] != new[n]):
                was, now = old[name], new[name]
                changed.append(f"{role} {name!r}: {was.dtype} {list(was.shape)} -> {now.dtype} {list(now.shape)}")
            if not changed and list(old) != list(new):
                changed.append(f"{role} order: {list(old)} -> {list(new)}")
            lines += changed
        if self.max_batch != other.max_batch:
            lines.append(f"max_batch: {self.max_batch or 'no limit'} -> {other.max_batch or 'no limit'}")
        return lines


def interface_from_wire(data: Any) -> Interface:
    """An interface document (``Interface.to_wire``); raises ArtifactRejected('manifest') naming the field."""
    if not isinstance(data, dict):
        raise _bad("interface is not an object")
    return Interface(_tensors(data, "inputs"), _tensors(data, "outputs"), _get(data, "max_batch", int))


def valid_name(text: str) -> bool:
    """A model name, version or file name as the manifest allows it: ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``."""
    return bool(_NAME_RE.match(text))


def semver_major(version: str) -> int | None:
    """The major number of a semantic version ('2.1.0' → 2), None when the version is not semver."""
    match = re.match(r"^v?(\d+)\.\d+", version)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str
    chunks: tuple[str, ...]


@dataclass(frozen=True)
class Hardware:
    """The target profile and the hardware facts an artifact depends on."""

    profile: str
    arch: str
    accelerator: str = "none"
    gpu_compute_capability: str | None = None
    tensorrt: str | None = None
    jetpack: str | None = None


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    release: int
    hardware: Hardware
    runtime: str
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: tuple[FileEntry, ...]
    chunk_size: int
    source_sha256: str
    created_at: str
    expires_at: str
    tools: dict[str, str] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    latency_ms: dict[str, Any] = field(default_factory=dict)
    max_batch: int = 0  # the most rows one call may carry; 0: no limit (part of the interface)
    schema: str = SCHEMA

    def to_wire(self) -> dict[str, Any]:
        data = asdict(self)
        if self.schema == SCHEMA_V1:
            del data["max_batch"]
        return data

    @property
    def artifact_id(self) -> str:
        """sha256 of the canonical manifest: the content address of the artifact."""
        return sha256_hex(canonical_json(self.to_wire()))

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def chunk_count(self) -> int:
        return sum(len(f.chunks) for f in self.files)

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)

    @property
    def interface(self) -> Interface:
        """What callers see: the same for every artifact of one ``name@version``."""
        return Interface(self.inputs, self.outputs, self.max_batch)

    def is_expired(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(UTC)) >= parse_time(self.expires_at)


def parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no timezone")
    return value


def format_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_text() -> str:
    """The current UTC time as message timestamps carry it."""
    return format_time(datetime.now(UTC))


def _bad(what: str) -> ArtifactRejected:
    return ArtifactRejected("manifest", what)


def _get(data: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(key)
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise _bad(f"field '{key}' missing or not {getattr(kind, '__name__', kind)}")
    return value


def _tensor(data: Any) -> TensorSpec:
    if not isinstance(data, dict):
        raise _bad("tensor spec is not an object")
    dtype = _get(data, "dtype", str)
    if dtype not in DTYPES:
        raise _bad(f"unknown dtype {dtype!r}")
    shape = _get(data, "shape", list)
    if not all(isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0) for d in shape):
        raise _bad(f"bad shape {shape!r}")
    return TensorSpec(name=_get(data, "name", str), dtype=dtype, shape=tuple(shape))


def _tensors(data: dict[str, Any], key: str) -> tuple[TensorSpec, ...]:
    tensors = tuple(_tensor(t) for t in _get(data, key, list))
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise _bad(f"{key} names {names} are not unique")
    return tensors


def _file(data: Any) -> FileEntry:
    if not isinstance(data, dict):
        raise _bad("file entry is not an object")
    path = _get(data, "path", str)
    if not _NAME_RE.match(path) or path in _RESERVED_FILES:
        raise _bad(f"file path {path!r} must be a plain file name other than {' and '.join(_RESERVED_FILES)}")
    chunks = _get(data, "chunks", list)
    sha = _get(data, "sha256", str)
    if not _SHA_RE.match(sha) or not all(isinstance(c, str) and _SHA_RE.match(c) for c in chunks):
        raise _bad(f"bad sha256 in file entry {path!r}")
    size = _get(data, "size", int)
    if size < 0:
        raise _bad(f"negative size for {path!r}")
    return FileEntry(path=path, size=size, sha256=sha, chunks=tuple(chunks))


def _hardware(data: Any) -> Hardware:
    if not isinstance(data, dict):
        raise _bad("field 'hardware' is not an object")
    optional = {k: data.get(k) for k in ("gpu_compute_capability", "tensorrt", "jetpack")}
    if not all(v is None or isinstance(v, str) for v in optional.values()):
        raise _bad("hardware versions must be strings")
    return Hardware(
        profile=_get(data, "profile", str),
        arch=_get(data, "arch", str),
        accelerator=_get(data, "accelerator", str),
        **optional,
    )


def manifest_from_wire(data: Any) -> Manifest:
    """Validate a decoded manifest document; raises ArtifactRejected('manifest') naming the field."""
    if not isinstance(data, dict) or data.get("schema") not in (SCHEMA, SCHEMA_V1):
        raise _bad(f"schema is not {SCHEMA!r}")
    name, version = _get(data, "name", str), _get(data, "version", str)
    if not _NAME_RE.match(name) or not _NAME_RE.match(version):
        raise _bad(f"bad model name or version {name!r}@{version!r}")
    release, chunk_size = _get(data, "release", int), _get(data, "chunk_size", int)
    if release < 1 or chunk_size < 1:
        raise _bad("release and chunk_size must be positive")
    max_batch = _get({"max_batch": 0, **data}, "max_batch", int) if data["schema"] == SCHEMA else 0
    if max_batch < 0:
        raise _bad("max_batch must be 0 (no limit) or positive")
    files = tuple(_file(f) for f in _get(data, "files", list))
    if len({f.path for f in files}) != len(files) or not files:
        raise _bad("files must be non-empty with unique paths")
    for entry in files:
        if len(entry.chunks) != max(1, -(-entry.size // chunk_size)):
            raise _bad(f"chunk count of {entry.path!r} does not match its size")
    try:
        created, expires = _get(data, "created_at", str), _get(data, "expires_at", str)
        parse_time(created), parse_time(expires)
    except ValueError as exc:
        raise _bad(str(exc)) from None
    return Manifest(
        name=name,
        version=version,
        release=release,
        hardware=_hardware(data.get("hardware")),
        runtime=_get(data, "runtime", str),
        precision=_get(data, "precision", str),
        inputs=_tensors(data, "inputs"),
        outputs=_tensors(data, "outputs"),
        files=files,
        chunk_size=chunk_size,
        source_sha256=_get(data, "source_sha256", str),
        created_at=created,
        expires_at=expires,
        tools=_get({"tools": {}, **data}, "tools", dict),
        validation=_get({"validation": {}, **data}, "validation", dict),
        latency_ms=_get({"latency_ms": {}, **data}, "latency_ms", dict),
        max_batch=max_batch,
        schema=data["schema"],
    )
