"""Signed desired states: the hub's Ed25519 signature over a device's desired state and its counter.

The hub signs the canonical JSON of the whole message except ``signature`` (so ``device_id``, ``counter``,
``deployment_id``, ``issued_at`` and every model, its ``rollback`` flag included, are covered). The
device verifies the bytes as they arrived, every field the hub sent included, not a re-encoding of the
fields it knows: a newer hub's extra field never breaks an older agent's check. The hub key is not an
artifact-signing key: it authorises desired states (docs/security.md), artifacts are authorised by
``trust/``.
"""

from __future__ import annotations

import dataclasses

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.protocol.canonical import strict_loads
from edge_agent.protocol.errors import ArtifactRejected, DesiredStateRefused
from edge_agent.protocol.messages import DesiredState, from_wire, to_wire
from edge_agent.protocol.signing import TrustStore, sign_document, verify_document


def sign_desired(state: DesiredState, key: Ed25519PrivateKey) -> bytes:
    """``state`` on the wire with the signature of ``key`` (``device_id`` and ``counter`` must be set)."""
    if not state.device_id or state.counter <= 0:
        raise ValueError("a signed desired state needs its device_id and a positive counter")
    body = strict_loads(to_wire(dataclasses.replace(state, signature={})))  # exactly what the device reads
    body.pop("signature")
    return to_wire(dataclasses.replace(state, signature=sign_document(body, key)))


def verify_desired(payload: bytes, hub_keys: TrustStore, device_id: str) -> DesiredState:
    """The desired state in ``payload`` when a hub key signed it for ``device_id``; DesiredStateRefused
    naming why otherwise (MessageError for a malformed message)."""
    state = from_wire(DesiredState, payload)
    if not state.signature:
        raise DesiredStateRefused(
            "desired state refused: it is unsigned and this device requires the hub's signature "
            "(it holds a hub key in hub-keys/); is the hub older than the device's enrollment?"
        )
    body = strict_loads(payload)
    signature = body.pop("signature")
    try:
        verify_document(body, signature, hub_keys)
    except ArtifactRejected as exc:
        raise DesiredStateRefused(
            f"desired state refused: its signature does not verify with the hub keys in hub-keys/ ({exc.detail})"
        ) from None
    if state.device_id != device_id:
        raise DesiredStateRefused(
            f"desired state refused: it was signed for device {state.device_id!r}, not {device_id!r} (replayed)"
        )
    if state.counter <= 0:
        raise DesiredStateRefused(f"desired state refused: counter {state.counter} is not a positive number")
    return state
