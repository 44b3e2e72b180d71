"""Message schemas for every MQTT topic, with paired ``to_wire`` / ``from_wire``.

JSON messages are frozen dataclasses decoded by one small typed codec, so a malformed message raises
``MessageError`` naming the field instead of surfacing later as a KeyError. Artifact chunks are binary:
``EFC1`` + file index + chunk index (big-endian uint32) + the bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from edge_agent.protocol.canonical import strict_loads
from edge_agent.protocol.errors import MessageError

T = TypeVar("T")
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
LATENCY_EDGES_MS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0)


def to_wire(message: Any) -> bytes:
    return json.dumps(dataclasses.asdict(message), separators=(",", ":")).encode()


def from_wire(cls: type[T], payload: bytes) -> T:
    """Decode and validate ``payload`` as ``cls``; raises MessageError naming the bad field."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise MessageError(f"{cls.__name__}: message of {len(payload)} bytes is over the limit")
    try:
        data = strict_loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"{cls.__name__}: not valid JSON ({exc})") from None
    return _decode(cls, data, cls.__name__)  # type: ignore[no-any-return]


def _decode(kind: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):
        if not isinstance(value, dict):
            raise MessageError(f"{where}: expected an object")
        hints = typing.get_type_hints(kind)
        args = {}
        for f in dataclasses.fields(kind):
            if f.name in value:
                args[f.name] = _decode(hints[f.name], value[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise MessageError(f"{where}.{f.name}: missing")
        return kind(**args)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            try:
                return _decode(option, value, where)
            except MessageError:
                continue
        raise MessageError(f"{where}: {value!r} does not match {kind}")
    if origin is tuple:
        item_kind = typing.get_args(kind)[0]
        if not isinstance(value, list):
            raise MessageError(f"{where}: expected a list")
        return tuple(_decode(item_kind, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise MessageError(f"{where}: expected an object")
        return value
    if kind is type(None):
        if value is not None:
            raise MessageError(f"{where}: expected null")
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is Any:
        return value
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise MessageError(f"{where}: expected {kind.__name__}, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class DesiredModel:
    """One model a device should run: the signed manifest travels with it so the agent can verify it
    before fetching a single chunk."""

    name: str
    version: str
    artifact_id: str
    manifest: dict[str, Any]
    signature: dict[str, Any]


@dataclass(frozen=True)
class DesiredState:
    deployment_id: str
    issued_at: str
    models: tuple[DesiredModel, ...] = ()


@dataclass(frozen=True)
class ReportedModel:
    name: str
    state: str  # downloading | installing | active | failed
    version: str | None = None
    artifact_id: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class ReportedState:
    device_id: str
    profile: str
    agent_version: str
    updated_at: str
    models: tuple[ReportedModel, ...] = ()


@dataclass(frozen=True)
class Status:
    state: str  # online | offline
    at: str


@dataclass(frozen=True)
class FetchRequest:
    """Chunks a device still lacks, as (file index, chunk index) pairs; empty means all of them."""

    artifact_id: str
    chunks: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class TelemetryWindow:
    model: str
    version: str
    route: str
    start: float
    end: float
    count: int
    errors: int
    latency_ms_sum: float
    latency_hist: tuple[int, ...] = ()  # counts on LATENCY_EDGES_MS plus one overflow bin
    budget_breaches: int = 0  # successful local calls that took longer than the SDK's latency budget


@dataclass(frozen=True)
class TensorHistogram:
    """Counts of one tensor's values on the reference bins of a model version (the drift feed)."""

    model: str
    version: str
    tensor: str
    edges: tuple[float, ...]
    counts: tuple[int, ...]
    calls: int = 0  # calls of this model version in the period (0: not recorded)
    summarised: int = 0  # of those, the calls whose tensors were counted; scale counts by calls / summarised


@dataclass(frozen=True)
class TelemetryBatch:
    """Calls of one device's spool. ``epoch`` names the spool (a random id made with it; "" from an agent
    older than epochs): the hub stores a batch once per (device, epoch, seq), so a new spool whose ``seq``
    starts again at 1 never collides with an old one. Non-finite numbers and negative counts are refused
    (MessageError naming the field), so they never reach the hub's store."""

    device_id: str
    seq: int
    windows: tuple[TelemetryWindow, ...] = ()
    dropped: int = 0
    histograms: tuple[TensorHistogram, ...] = ()
    epoch: str = ""

    def __post_init__(self) -> None:
        _check_counts("TelemetryBatch", self, ("seq", "dropped"))
        for i, window in enumerate(self.windows):
            where = f"TelemetryBatch.windows[{i}]"
            _check_counts(where, window, ("count", "errors", "budget_breaches"))
            _check_finite(where, window, ("start", "end", "latency_ms_sum"))
            _check_items(f"{where}.latency_hist", window.latency_hist, finite=False)
        for i, histogram in enumerate(self.histograms):
            where = f"TelemetryBatch.histograms[{i}]"
            _check_counts(where, histogram, ("calls", "summarised"))
            _check_items(f"{where}.edges", histogram.edges, finite=True)
            _check_items(f"{where}.counts", histogram.counts, finite=False)


def _check_counts(where: str, message: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(message, name) < 0:
            raise MessageError(f"{where}.{name}: negative count {getattr(message, name)!r}")


def _check_finite(where: str, message: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if not math.isfinite(getattr(message, name)):
            raise MessageError(f"{where}.{name}: {getattr(message, name)!r} is not a finite number")


def _check_items(where: str, values: tuple[float, ...], finite: bool) -> None:
    """Every value finite (``finite``) or a count (not negative)."""
    for i, value in enumerate(values):
        if (finite and not math.isfinite(value)) or (not finite and value < 0):
            raise MessageError(f"{where}[{i}]: {value!r} is not {'a finite number' if finite else 'a count'}")


@dataclass(frozen=True)
class TelemetryAck:
    seq: int
    epoch: str = ""  # the spool the batch came from ("": an older agent's)


_CHUNK_HEADER = struct.Struct(">4sII")
_CHUNK_MAGIC = b"EFC1"


@dataclass(frozen=True)
class Chunk:
    file_index: int
    chunk_index: int
    data: bytes = field(repr=False)

    def to_wire(self) -> bytes:
        return _CHUNK_HEADER.pack(_CHUNK_MAGIC, self.file_index, self.chunk_index) + self.data

    @classmethod
    def from_wire(cls, payload: bytes) -> Chunk:
        if len(payload) < _CHUNK_HEADER.size or payload[:4] != _CHUNK_MAGIC:
            raise MessageError("Chunk: missing EFC1 header")
        _, file_index, chunk_index = _CHUNK_HEADER.unpack_from(payload)
        return cls(file_index, chunk_index, payload[_CHUNK_HEADER.size :])
