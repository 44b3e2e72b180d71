"""Message schemas for every MQTT topic, with paired ``to_wire`` / ``from_wire``.

JSON messages are frozen dataclasses decoded by one small typed codec (``codec.py``; ``to_wire``,
``from_wire`` and MAX_MESSAGE_BYTES are importable from here too), so a malformed message raises
``MessageError`` naming the field instead of surfacing later as a KeyError. Artifact chunks are binary:
``EFC1`` + file index + chunk index (big-endian uint32) + the bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from edge_agent.protocol.canonical import strict_loads
from edge_agent.protocol.codec import MAX_MESSAGE_BYTES as MAX_MESSAGE_BYTES
from edge_agent.protocol.codec import check_size, decode
from edge_agent.protocol.codec import from_wire as from_wire
from edge_agent.protocol.codec import to_wire as to_wire
from edge_agent.protocol.errors import MessageError as MessageError

MAX_DESIRED_MODELS = 100  # models one device may be told to run; the hub refuses a deploy past it
MAX_REPORTED_BYTES = 256 * 1024  # a device's reported state; it refuses to send a bigger one
MAX_ERROR_CHARS = 1000  # an error in a report is cut to this (the device keeps the whole one in its log)
LATENCY_EDGES_MS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0)


def short_error(text: str) -> str:
    """``text`` cut to MAX_ERROR_CHARS, marked as cut, for a report."""
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 16] + " ... (truncated)"


@dataclass(frozen=True)
class DesiredAB:
    """The B side of an A/B test of a model (docs/ab.md): installed beside the model's (A) version, never
    made active; the SDK sends ``split`` percent of calls to it (0 < split < 100, 0.01 resolution), sticky
    per request key. ``ab_id`` names the test (and salts the key hash). The artifact is checked exactly
    like A's (signature, profile, expiry); inside a hub-signed state its release may be below A's."""

    ab_id: str
    version: str
    artifact_id: str
    manifest: dict[str, Any]
    signature: dict[str, Any]
    split: float


@dataclass(frozen=True)
class DesiredModel:
    """One model a device should run: the signed manifest travels with it so the agent can verify it
    before fetching a single chunk."""

    name: str
    version: str
    artifact_id: str
    manifest: dict[str, Any]
    signature: dict[str, Any]
    # a signed rollback: this version may have a release below the installed ones. Honoured only inside a
    # desired state signed by the hub's key (docs/security.md); anywhere else it is refused as a downgrade
    rollback: bool = False
    # an A/B test on this device (hubs since issue 13; older agents ignore it and run ``version`` alone)
    ab: DesiredAB | None = None


@dataclass(frozen=True)
class DesiredState:
    """At most MAX_DESIRED_MODELS models: more is refused when made (the hub's deploy) and when read
    (the device, which reports the refusal as the state's ``error``).

    Signed states (hubs since issue 13) add ``device_id``, ``counter`` (per device, strictly increasing)
    and ``signature`` (the hub key's Ed25519 signature over the canonical JSON of every other field, as
    sent: ``protocol/desired_signing.py``). An older hub sends none of them ("", 0, {})."""

    deployment_id: str
    issued_at: str
    models: tuple[DesiredModel, ...] = ()
    device_id: str = ""
    counter: int = 0
    signature: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.models) > MAX_DESIRED_MODELS:
            raise MessageError(
                f"DesiredState.models: {len(self.models)} models, over the limit of {MAX_DESIRED_MODELS} "
                "per device; remove models from the device's desired state"
            )


@dataclass(frozen=True)
class DesiredRequest:
    """A device asks for its desired state after each connection, since the retained copy may be gone
    (a broker that lost it). ``have``: ``desired_digest`` of the last one it applied ("" none); the hub
    sends the registry's when it differs, at most every 30 s per device."""

    have: str = ""


def desired_digest(artifact_ids: typing.Iterable[str]) -> str:
    """Names the content of a desired state (its artifacts, in any order)."""
    return hashlib.sha256(",".join(sorted(artifact_ids)).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ReportedModel:
    name: str
    state: str  # downloading | installing | active | failed
    version: str | None = None
    artifact_id: str | None = None
    error: str | None = None
    origin: str = ""  # "local": switched on the device (edge-agent rollback/activate), not by the desired state
    ab: ReportedAB | None = None  # the B side of an A/B test on this device (docs/ab.md); None: no test


@dataclass(frozen=True)
class ReportedAB:
    """The B side of an A/B test as the device has it: ``state`` downloading | active (installed, the SDK
    splits calls) | failed (``error``; A keeps every call)."""

    ab_id: str
    version: str
    artifact_id: str
    split: float
    state: str
    error: str | None = None


@dataclass(frozen=True)
class ReportedState:
    """What a device runs, at most MAX_REPORTED_BYTES on the wire (refused by ``to_wire`` on the device
    and by ``from_wire`` at the hub). ``error``: why the device could not follow its desired state at
    all (a desired state it refused, a report it had to cut); per-model failures are on the models."""

    max_bytes: ClassVar[int] = MAX_REPORTED_BYTES
    device_id: str
    profile: str
    agent_version: str
    updated_at: str
    models: tuple[ReportedModel, ...] = ()
    error: str | None = None
    desired_counter: int = 0  # the counter of the last signed desired state the device accepted (0: none)
    keyset_version: int = 0  # the version of the signed key set the device holds (0: none; protocol/keyset.py)


def reported_to_wire(state: ReportedState) -> bytes:
    """``state`` on the wire within MAX_REPORTED_BYTES: when too big, the models that do not fit are left
    out (in order) and ``error`` says how many, so the hub shows a refusal instead of dropping it."""
    try:
        return to_wire(state)
    except MessageError as exc:
        reason = str(exc)
    kept: list[ReportedModel] = []
    room = MAX_REPORTED_BYTES - 2 * MAX_ERROR_CHARS - len(to_wire(dataclasses.replace(state, models=())))
    for model in state.models:
        room -= len(to_wire(model)) + 1
        if room < 0:
            break
        kept.append(model)
    error = f"report cut to {len(kept)} of {len(state.models)} models ({reason})"
    return to_wire(dataclasses.replace(state, models=tuple(kept), error=short_error(error)))


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
            if window.errors > window.count or window.budget_breaches > window.count:
                raise MessageError(f"{where}: errors and budget_breaches cannot exceed count ({window.count})")
            _check_finite(where, window, ("start", "end", "latency_ms_sum"))
            _check_items(f"{where}.latency_hist", window.latency_hist, finite=False)
        for i, histogram in enumerate(self.histograms):
            where = f"TelemetryBatch.histograms[{i}]"
            _check_counts(where, histogram, ("calls", "summarised"))
            _check_items(f"{where}.edges", histogram.edges, finite=True)
            _check_items(f"{where}.counts", histogram.counts, finite=False)


MAX_COUNT = 2**53  # a count above this is nonsense (and would overflow the hub's 64-bit sums)


def _check_counts(where: str, message: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if not 0 <= getattr(message, name) <= MAX_COUNT:
            raise MessageError(f"{where}.{name}: {getattr(message, name)!r} is not a count (0 to 2**53)")


def _check_finite(where: str, message: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if not math.isfinite(getattr(message, name)):
            raise MessageError(f"{where}.{name}: {getattr(message, name)!r} is not a finite number")


def _check_items(where: str, values: tuple[float, ...], finite: bool) -> None:
    """Every value finite (``finite``) or a count (not negative)."""
    for i, value in enumerate(values):
        if (finite and not math.isfinite(value)) or (not finite and not 0 <= value <= MAX_COUNT):
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


MAX_EXAMPLE_BYTES = 1024 * 1024  # one hard example on the wire (header + npz); the device refuses bigger ones
MAX_EXAMPLE_REASON_CHARS = 200
_EXAMPLE_HEADER = struct.Struct(">4sI")
_EXAMPLE_MAGIC = b"EFX1"


@dataclass(frozen=True)
class ExampleHeader:
    """What a hard example is: ``example_id`` (32 hex digits, random, made on the device: the hub stores
    an example once per id), the model version that saw it, why it was kept and when (Unix seconds)."""

    example_id: str
    device_id: str
    model: str
    version: str
    reason: str
    at: float

    def __post_init__(self) -> None:
        if len(self.example_id) != 32 or any(c not in "0123456789abcdef" for c in self.example_id):
            raise MessageError(f"ExampleHeader.example_id: {self.example_id!r} is not 32 lowercase hex digits")
        if not self.model:
            raise MessageError("ExampleHeader.model: empty; name the model the sample was given to")
        if len(self.reason) > MAX_EXAMPLE_REASON_CHARS:
            raise MessageError(f"ExampleHeader.reason: over {MAX_EXAMPLE_REASON_CHARS} characters; shorten it")
        _check_finite("ExampleHeader", self, ("at",))


@dataclass(frozen=True)
class HardExample:
    """An opt-in sample for retraining (docs/sdk.md, "Hard examples"). Binary on the wire, like a chunk:
    ``EFX1`` + uint32 header length (big-endian) + the header's JSON + the arrays as an ``.npz`` file
    (``input/NAME``, ``output/NAME``), at most MAX_EXAMPLE_BYTES in all: ``to_wire`` refuses a bigger
    one (the device never sends it) and ``from_wire`` refuses to read one."""

    max_bytes: ClassVar[int] = MAX_EXAMPLE_BYTES
    header: ExampleHeader
    npz: bytes = field(repr=False)

    def to_wire(self) -> bytes:
        header = json.dumps(dataclasses.asdict(self.header), separators=(",", ":")).encode()
        payload = _EXAMPLE_HEADER.pack(_EXAMPLE_MAGIC, len(header)) + header + self.npz
        check_size(HardExample, payload)
        return payload

    @classmethod
    def from_wire(cls, payload: bytes) -> HardExample:
        check_size(cls, payload)
        if len(payload) < _EXAMPLE_HEADER.size or payload[:4] != _EXAMPLE_MAGIC:
            raise MessageError("HardExample: missing EFX1 header")
        _, length = _EXAMPLE_HEADER.unpack_from(payload)
        end = _EXAMPLE_HEADER.size + length
        if end > len(payload):
            raise MessageError(f"HardExample: header of {length} bytes runs past the message's end")
        try:
            data = strict_loads(payload[_EXAMPLE_HEADER.size : end])
        except (ValueError, UnicodeDecodeError) as exc:
            raise MessageError(f"HardExample.header: not valid JSON ({exc})") from None
        return cls(decode(ExampleHeader, data, "HardExample.header"), payload[end:])


@dataclass(frozen=True)
class HardExampleAck:
    """The hub stored ``example_id`` (or already had it); ``error``: it refused it for good (say, arrays
    that are not an npz), so the device drops it too and counts it as refused."""

    example_id: str
    error: str = ""
