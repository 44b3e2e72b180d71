"""The signed key set's wire format and acceptance rules (edge_agent/protocol/keyset.py), without a broker:
each rule refuses what it must, and the message round-trips."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.protocol.errors import KeySetRefused
from edge_agent.protocol.keyset import (
    MAX_MESSAGE_BYTES,
    KeySet,
    accept,
    accept_chain,
    bootstrap,
    build,
    from_message,
    parse,
    sign,
    to_message,
)
from edge_agent.protocol.signing import key_id

A, B, C, ART, OTHER = (Ed25519PrivateKey.generate() for _ in range(5))


def ks(version: int, roots: list[Ed25519PrivateKey], signers: list[Ed25519PrivateKey],
       revoked: set[str] | None = None, keys: list[Ed25519PrivateKey] | None = None) -> KeySet:  # fmt: skip
    signed = build(version, "t", [r.public_key() for r in roots], [k.public_key() for k in keys or [ART]],
                   revoked or set())  # fmt: skip
    return parse(sign(signed, signers))


def test_the_message_round_trips_and_is_bounded() -> None:
    chain = [ks(1, [A], [A]), ks(2, [B], [A, B])]
    parsed = from_message(to_message([c.envelope for c in chain]))
    assert [p.version for p in parsed] == [1, 2] and set(parsed[1].roots) == {key_id(B.public_key())}
    assert parsed[1].artifact_trust().keys.keys() == {key_id(ART.public_key())}
    with pytest.raises(KeySetRefused, match="versions must grow"):
        from_message(to_message([chain[1].envelope, chain[0].envelope]))
    with pytest.raises(KeySetRefused, match="over"):
        from_message(b" " * (MAX_MESSAGE_BYTES + 1))
    with pytest.raises(KeySetRefused, match="not JSON"):
        from_message(b"{nope")


def test_accept_rules() -> None:
    v1 = ks(1, [A], [A])
    assert accept(v1, v1) is None  # the same one again
    assert accept(v1, ks(2, [A], [A])) is not None
    with pytest.raises(KeySetRefused, match="not above 1"):
        accept(v1, ks(1, [A], [A], keys=[OTHER]))  # another document under the same version
    with pytest.raises(KeySetRefused, match="not above 2"):
        accept(ks(2, [A], [A]), v1)  # a replay
    with pytest.raises(KeySetRefused, match="not signed by a hub key of the key set this device holds"):
        accept(v1, ks(2, [B], [B]))  # a new root that only signs itself
    with pytest.raises(KeySetRefused, match="did not sign"):
        accept(v1, ks(2, [A, B], [A]))  # a new root added without its own signature
    assert accept(v1, ks(2, [B], [A, B])) is not None  # a rotation, signed by the old and the new key
    revoked = ks(2, [A], [A], revoked={key_id(OTHER.public_key())})
    with pytest.raises(KeySetRefused, match="trust again revoked"):
        accept(revoked, ks(3, [A], [A]))
    walked = accept_chain(v1, [ks(2, [B], [A, B]), ks(3, [C], [B, C])])  # missed two rotations
    assert walked is not None and walked.version == 3 and set(walked.roots) == {key_id(C.public_key())}
    # a device set up with only the current hub key (init --hub-key after rotations) joins where it signs
    joined = accept_chain(bootstrap({key_id(C.public_key()): C.public_key()}),
                          [ks(1, [A], [A]), ks(2, [B], [A, B]), ks(3, [C], [B, C]), ks(4, [C], [C])])  # fmt: skip
    assert joined is not None and joined.version == 4
    with pytest.raises(KeySetRefused, match="not signed by a hub key"):
        accept_chain(v1, [ks(3, [C], [B, C])])  # a step of the chain missing


def altered(envelope: dict[str, Any], **changes: Any) -> dict[str, Any]:
    copy: dict[str, Any] = json.loads(json.dumps(envelope))
    copy["signed"].update(changes)
    return copy


def test_malformed_key_sets_are_refused() -> None:
    good = ks(1, [A], [A]).envelope
    root = good["signed"]["roots"][0]
    cases = {
        "not its key's": altered(
            good, keys=[{"key_id": "0" * 16, "public_key": good["signed"]["keys"][0]["public_key"]}]
        ),
        "cannot be an artifact-signing key": altered(good, keys=[root]),
        "revoked key cannot be trusted": altered(good, revoked=[root["key_id"]]),
        "names no root": altered(good, roots=[]),
        "whole number": altered(good, version=True),
        "not a key set": altered(good, type="other"),
        "does not verify": altered(good, issued_at="later"),
    }
    for expected, envelope in cases.items():
        with pytest.raises(KeySetRefused, match=expected):
            parse(envelope)
    with pytest.raises(KeySetRefused, match="signatures must be"):
        parse({"signed": good["signed"], "signatures": good["signatures"] * 9})
    with pytest.raises(KeySetRefused, match="not signed by any of its own root keys"):
        parse(sign(good["signed"], [OTHER]))
