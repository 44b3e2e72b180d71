"""What a device trusts: the signed key set it holds (``edge_agent/protocol/keyset.py``).

    STATE/keyset.json   the key set this device took last (its envelope, as signed; write-fsync-rename)
    STATE/trust/*.pub   keys added on the device itself (``edge-agent init --trust``)
    STATE/hub-keys/     the hub key of an enrollment before key sets (or ``init --hub-key``): used only
                        while no key set is held, and then only to take the first one

Artifacts: the key set's keys and ``trust/*.pub``, less every key the key set revokes (refused by name).
Desired states and the next key set: the key set's root (hub) keys; ``hub-keys/`` while none is held.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.desired_guard import HUB_KEYS_DIR
from edge_agent.protocol.atomic import atomic_write_bytes
from edge_agent.protocol.canonical import canonical_json, strict_loads
from edge_agent.protocol.errors import KeySetRefused
from edge_agent.protocol.keyset import KeySet, accept_chain, bootstrap, from_message, parse, signers
from edge_agent.protocol.signing import TrustStore, key_id

log = logging.getLogger(__name__)
KEYSET_FILE = "keyset.json"
TRUST_DIR = "trust"


def held_keyset(state_dir: Path) -> KeySet | None:
    """The key set in ``STATE/keyset.json``; None when there is none; ValueError naming the file when it
    cannot be read or is not a well-formed key set (never silently ignored: that would widen the trust)."""
    path = state_dir / KEYSET_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        return parse(strict_loads(data))
    except (ValueError, KeySetRefused) as exc:
        raise ValueError(f"{path}: not a usable key set ({exc}); enroll the device again to replace it") from None


def _local(state_dir: Path, directory: str) -> TrustStore:
    path = state_dir / directory
    return TrustStore.from_dir(path) if path.is_dir() else TrustStore({})


def artifact_trust(state_dir: Path) -> TrustStore:
    """The keys whose artifact signatures this device accepts (module docstring)."""
    local = _local(state_dir, TRUST_DIR)
    held = held_keyset(state_dir)
    if held is None:
        return local
    keys = {**local.keys, **held.keys}
    return TrustStore({k: v for k, v in keys.items() if k not in held.revoked}, held.revoked)


def hub_trust(state_dir: Path) -> TrustStore:
    """The hub keys that verify desired states: the key set's roots, or ``hub-keys/`` while none is held."""
    held = held_keyset(state_dir)
    return held.root_trust() if held is not None else _local(state_dir, HUB_KEYS_DIR)


def store_keyset(state_dir: Path, keyset: KeySet) -> None:
    """Write-fsync-rename: a crash leaves the old key set or the new one, never half of one."""
    atomic_write_bytes(state_dir / KEYSET_FILE, canonical_json(keyset.envelope))


def take_keyset(state_dir: Path, payload: bytes) -> KeySet | None:
    """Take the newest key set of a retained keyset message when the rules allow it (protocol/keyset.py):
    stored before this returns; None when the device already holds it. KeySetRefused (nothing written)
    otherwise, also when the device holds no hub key to check it with."""
    chain = from_message(payload)
    current = held_keyset(state_dir)
    if current is None:
        roots = _local(state_dir, HUB_KEYS_DIR).keys
        if not roots:
            raise KeySetRefused("key set refused: this device holds no hub key to verify it (enrolled before "
                                "key sets, without --hub-key); enroll it again")  # fmt: skip
        current = bootstrap(roots)
    taken = accept_chain(current, chain)
    if taken is not None:
        store_keyset(state_dir, taken)
    return taken


def enrollment_keyset(envelope: object, hub_key: Ed25519PublicKey) -> KeySet:
    """The key set of an enrollment answer: well formed, naming ``hub_key`` (the pinned, or TLS-authenticated,
    hub key) as a root and signed by it; KeySetRefused otherwise."""
    keyset = parse(envelope)
    kid = key_id(hub_key)
    if kid not in keyset.roots or kid not in signers(keyset, {kid: hub_key}):
        raise KeySetRefused(f"key set refused: it is not signed by the hub key {kid} the enrollment authenticated")
    return keyset
