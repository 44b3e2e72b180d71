"""The signed key set (a TUF-like root): the keys a fleet trusts, which ones are revoked, and the hub
(root) keys that sign the key set itself and every desired state.

On the wire (the enrollment answer's ``keyset``; each envelope of the retained ``devices/{id}/keyset``
message, whose body is ``{"chain": [envelope, ...]}``):

    {"signed": {"type": "edgefed-keyset", "version": N, "issued_at": T,
                "roots":   [{"key_id": ID, "public_key": PEM}, ...],   the hub keys
                "keys":    [{"key_id": ID, "public_key": PEM}, ...],   artifact-signing keys
                "revoked": [ID, ...]},                                  never trusted again
     "signatures": [{"alg": "ed25519", "key_id": ID, "sig": B64}, ...]}

Each signature is over the canonical JSON of ``signed``. A key set is well formed (``parse``) when every
key id is its key's (``signing.key_id``), no root is an artifact key or revoked, no trusted key is
revoked, and one of its own roots signed it. A device holding key set ``current`` takes ``new``
(``accept``) only when

1. ``new.version`` is above ``current.version`` (the same version again: a repeat, ignored; a different
   document under the same version, or an older one: refused — a replay);
2. a root of ``current`` signed it, and every root of ``new`` that ``current`` lacks signed it too (a
   rotation is signed by the old and the new hub key);
3. it revokes at least what ``current`` revokes (a revoked key is never reinstated).

The retained message carries every key set that changed the roots since the first, then the newest, so a
device that missed several rotations walks the chain (``accept_chain``).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.protocol.canonical import canonical_json, strict_loads
from edge_agent.protocol.errors import ArtifactRejected, KeySetRefused
from edge_agent.protocol.signing import TrustStore, key_id, public_key_from_pem, sign_document, verify_document

KEYSET_TYPE = "edgefed-keyset"
MAX_MESSAGE_BYTES = 1 << 20  # the retained message, a whole chain
MAX_KEYS = 256  # artifact keys (revoked ids: 16 times as many)
MAX_ROOTS = 8
MAX_SIGNATURES = 8
MAX_CHAIN = 64
_KEY_ID = re.compile(r"^[0-9a-f]{16}\Z")


@dataclass(frozen=True)
class KeySet:
    """A parsed, well-formed key set. ``envelope``: exactly what was signed and sent (stored as is)."""

    version: int
    issued_at: str
    roots: dict[str, Ed25519PublicKey]
    keys: dict[str, Ed25519PublicKey]
    revoked: frozenset[str]
    envelope: dict[str, Any] = field(default_factory=dict, compare=False)

    def artifact_trust(self) -> TrustStore:
        """The artifact-signing keys, less the revoked ones (which are refused by name)."""
        return TrustStore({k: v for k, v in self.keys.items() if k not in self.revoked}, self.revoked)

    def root_trust(self) -> TrustStore:
        """The hub keys: they verify desired states and the next key set."""
        return TrustStore(dict(self.roots))


def public_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def build(version: int, issued_at: str, roots: Iterable[Ed25519PublicKey], keys: Iterable[Ed25519PublicKey],
          revoked: Iterable[str]) -> dict[str, Any]:  # fmt: skip
    """The ``signed`` part of a key set (not yet signed)."""

    def entries(found: Iterable[Ed25519PublicKey]) -> list[dict[str, str]]:
        return sorted(({"key_id": key_id(k), "public_key": public_pem(k)} for k in found), key=lambda e: e["key_id"])

    return {"type": KEYSET_TYPE, "version": version, "issued_at": issued_at, "roots": entries(roots),
            "keys": entries(keys), "revoked": sorted(set(revoked))}  # fmt: skip


def sign(signed: dict[str, Any], private_keys: Iterable[Ed25519PrivateKey]) -> dict[str, Any]:
    """The envelope: ``signed`` with a signature by each of ``private_keys``."""
    return {"signed": signed, "signatures": [sign_document(signed, k) for k in private_keys]}


def _refuse(detail: str) -> KeySetRefused:
    return KeySetRefused(f"key set refused: {detail}")


def _keys(entries: Any, where: str, limit: int) -> dict[str, Ed25519PublicKey]:
    if not isinstance(entries, list) or len(entries) > limit:
        raise _refuse(f"{where} must be a list of at most {limit} keys")
    found: dict[str, Ed25519PublicKey] = {}
    for entry in entries:
        if not isinstance(entry, dict) or set(entry) != {"key_id", "public_key"}:
            raise _refuse(f"each of {where} must hold exactly key_id and public_key")
        try:
            public = public_key_from_pem(str(entry["public_key"]).encode(), where)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise _refuse(f"{where}: {str(entry['key_id'])[:16]!r} is not an Ed25519 public key") from None
        if key_id(public) != entry["key_id"]:
            raise _refuse(f"{where}: key id {str(entry['key_id'])[:16]!r} is not its key's ({key_id(public)})")
        found[key_id(public)] = public
    return found


def _signed_fields(signed: Any) -> tuple[int, str, list[str]]:
    if not isinstance(signed, dict) or signed.get("type") != KEYSET_TYPE:
        raise _refuse(f"not a key set (type must be {KEYSET_TYPE!r})")
    version, issued_at, revoked = signed.get("version"), signed.get("issued_at"), signed.get("revoked")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _refuse("version must be a whole number, 1 or more")
    if not isinstance(issued_at, str):
        raise _refuse("issued_at must be a string")
    if (
        not isinstance(revoked, list)
        or len(revoked) > 16 * MAX_KEYS
        or not all(isinstance(r, str) and _KEY_ID.match(r) for r in revoked)
    ):
        raise _refuse("revoked must be a list of key ids (16 hex digits)")
    return version, issued_at, revoked


def parse(envelope: Any) -> KeySet:
    """A well-formed key set (module docstring) signed by one of its own roots; KeySetRefused otherwise."""
    if not isinstance(envelope, dict) or set(envelope) != {"signed", "signatures"}:
        raise _refuse("an envelope holds exactly 'signed' and 'signatures'")
    version, issued_at, revoked = _signed_fields(envelope["signed"])
    roots = _keys(envelope["signed"].get("roots"), "roots", MAX_ROOTS)
    keys = _keys(envelope["signed"].get("keys"), "keys", MAX_KEYS)
    if not roots:
        raise _refuse("it names no root (hub) key")
    if set(roots) & set(keys):
        raise _refuse("a hub key cannot be an artifact-signing key")
    if (set(roots) | set(keys)) & set(revoked):
        raise _refuse("a revoked key cannot be trusted")
    found = KeySet(version, issued_at, roots, keys, frozenset(revoked), envelope)
    if not signers(found, found.roots):
        raise _refuse(f"version {version} is not signed by any of its own root keys")
    return found


def signers(keyset: KeySet, trusted: dict[str, Ed25519PublicKey]) -> set[str]:
    """The ids of the ``trusted`` keys whose signature of ``keyset`` verifies; KeySetRefused when one
    claiming a trusted key does not (an altered key set)."""
    records = keyset.envelope.get("signatures")
    if not isinstance(records, list) or not 1 <= len(records) <= MAX_SIGNATURES:
        raise _refuse(f"signatures must be a list of 1 to {MAX_SIGNATURES} records")
    verified = set()
    for record in records:
        kid = record.get("key_id") if isinstance(record, dict) else None
        if not isinstance(kid, str) or kid not in trusted:
            continue  # a key this holder does not know: it proves nothing here
        try:
            verify_document(keyset.envelope["signed"], record, TrustStore({kid: trusted[kid]}))
        except ArtifactRejected:
            raise _refuse(f"its signature by {kid} does not verify (altered)") from None
        verified.add(kid)
    return verified


def accept(current: KeySet, new: KeySet) -> KeySet | None:
    """``new`` when a holder of ``current`` may take it (module docstring); None for ``current`` again;
    KeySetRefused naming the rule otherwise."""
    if new.version == current.version and canonical_json(new.envelope.get("signed")) == canonical_json(
        current.envelope.get("signed")
    ):
        return None
    if new.version <= current.version:
        raise _refuse(f"version {new.version} is not above {current.version}, the one this device holds "
                      "(a replayed or older key set)")  # fmt: skip
    if not signers(new, current.roots):
        raise _refuse(f"version {new.version} is not signed by a hub key of the key set this device holds "
                      f"({', '.join(sorted(current.roots))})")  # fmt: skip
    added = set(new.roots) - set(current.roots)
    missing = added - signers(new, new.roots)
    if missing:
        raise _refuse(f"new hub key {', '.join(sorted(missing))} did not sign version {new.version}")
    if current.revoked - new.revoked:
        raise _refuse(
            f"version {new.version} would trust again revoked {', '.join(sorted(current.revoked - new.revoked))}"
        )
    return new


def accept_chain(current: KeySet, chain: list[KeySet]) -> KeySet | None:
    """Walk ``chain`` (oldest first) from ``current``, skipping what it already has: the newest key set
    taken, or None when nothing was newer. KeySetRefused when a step is refused (nothing is taken)."""
    held, changed = current, False
    if current.version == 0:  # only hub keys held (bootstrap): join the chain where one of them signs
        start = next((i for i, step in enumerate(chain) if signers(step, current.roots)), 0)
        chain = chain[start:]
    for step in chain:
        if step.version < held.version:
            continue
        taken = accept(held, step)
        if taken is not None:
            held, changed = taken, True
    if chain and chain[-1].version < current.version:
        raise _refuse(f"version {chain[-1].version} is not above {current.version}, the one this device holds "
                      "(a replayed or older key set)")  # fmt: skip
    return held if changed else None


def bootstrap(roots: dict[str, Ed25519PublicKey]) -> KeySet:
    """Version 0: a device that holds only hub keys (``hub-keys/``, from an older enrollment or
    ``edge-agent init --hub-key``) takes the first key set one of them signed."""
    return KeySet(0, "", dict(roots), {}, frozenset())


def to_message(envelopes: list[dict[str, Any]]) -> bytes:
    return canonical_json({"chain": envelopes})


def from_message(payload: bytes) -> list[KeySet]:
    """The chain in a retained keyset message, oldest first; KeySetRefused when malformed."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise _refuse(f"the message is over {MAX_MESSAGE_BYTES} bytes")
    try:
        body = strict_loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _refuse(f"not JSON ({exc})") from None
    chain = body.get("chain") if isinstance(body, dict) else None
    if not isinstance(chain, list) or not 1 <= len(chain) <= MAX_CHAIN:
        raise _refuse(f"the message must hold a chain of 1 to {MAX_CHAIN} key sets")
    parsed = [parse(envelope) for envelope in chain]
    if any(b.version <= a.version for a, b in itertools.pairwise(parsed)):
        raise _refuse("the chain's versions must grow")
    return parsed
