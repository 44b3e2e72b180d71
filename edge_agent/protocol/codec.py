"""The typed JSON codec of the MQTT messages (``messages.py``): ``to_wire`` / ``from_wire`` and the size
limit every message is held to.

Messages are frozen dataclasses; ``from_wire`` decodes them field by field against their type hints, so
a malformed message raises ``MessageError`` naming the field instead of surfacing later as a KeyError.
A message type may set a smaller limit than MAX_MESSAGE_BYTES with a ``max_bytes`` class variable.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from typing import Any, TypeVar

from edge_agent.protocol.canonical import strict_loads
from edge_agent.protocol.errors import MessageError

T = TypeVar("T")
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


def to_wire(message: Any) -> bytes:
    """JSON bytes of ``message``; MessageError when they are over its type's limit (``max_bytes``), so
    the sender refuses what the receiver would refuse."""
    payload = json.dumps(dataclasses.asdict(message), separators=(",", ":")).encode()
    check_size(type(message), payload)
    return payload


def from_wire(cls: type[T], payload: bytes) -> T:
    """Decode and validate ``payload`` as ``cls``; raises MessageError naming the bad field."""
    check_size(cls, payload)
    try:
        data = strict_loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"{cls.__name__}: not valid JSON ({exc})") from None
    return decode(cls, data, cls.__name__)  # type: ignore[no-any-return]


def check_size(cls: type[Any], payload: bytes) -> None:
    """MessageError when ``payload`` is over ``cls``'s limit (``max_bytes``, else MAX_MESSAGE_BYTES)."""
    limit = getattr(cls, "max_bytes", MAX_MESSAGE_BYTES)
    if len(payload) > limit:
        raise MessageError(f"{cls.__name__}: message of {len(payload)} bytes is over the limit of {limit} bytes")


@functools.cache
def _type_hints(kind: type[Any]) -> dict[str, Any]:
    """A message type's resolved field types (``get_type_hints`` evaluates every annotation again on each
    call: most of what decoding a telemetry batch cost)."""
    return typing.get_type_hints(kind)


def decode(kind: Any, value: Any, where: str) -> Any:
    """``value`` (parsed JSON) as the type ``kind``; MessageError naming ``where`` when it is not one."""
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):
        if not isinstance(value, dict):
            raise MessageError(f"{where}: expected an object")
        hints = _type_hints(kind)
        args = {}
        for f in dataclasses.fields(kind):
            if f.name in value:
                args[f.name] = decode(hints[f.name], value[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise MessageError(f"{where}.{f.name}: missing")
        return kind(**args)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            try:
                return decode(option, value, where)
            except MessageError:
                continue
        raise MessageError(f"{where}: {value!r} does not match {kind}")
    if origin is tuple:
        item_kind = typing.get_args(kind)[0]
        if not isinstance(value, list):
            raise MessageError(f"{where}: expected a list")
        return tuple(decode(item_kind, v, f"{where}[{i}]") for i, v in enumerate(value))
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
