"""Canonical JSON: the exact bytes that are hashed and signed."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8, no NaN/Infinity: equal documents give equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def strict_loads(data: bytes | str) -> Any:
    """json.loads that refuses duplicate keys and a byte-order mark (two parsers must never disagree on
    a signed document: ``json.loads`` accepts a BOM in bytes but refuses it in text)."""
    if data[:3] == b"\xef\xbb\xbf" or data[:1] == "\ufeff":
        raise ValueError("a byte-order mark is not allowed (plain UTF-8 JSON only)")
    return json.loads(data, object_pairs_hook=_reject_duplicates)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
