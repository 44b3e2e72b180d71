"""Errors of the wire contract.

ProtocolError
├── MessageError        a message on a topic is malformed (counted and logged, never fatal)
│   └── DesiredStateRefused  a well-formed desired state the device must not follow: unsigned or
│                        badly signed where the hub's signature is required, another device's,
│                        or a counter not above the last one accepted (a replay)
│   └── KeySetRefused    a key set the device must not take: malformed, not signed by a hub key it
│                        holds, or not newer than its own (protocol/keyset.py)
└── ArtifactRejected    an artifact failed verification; ``reason`` says which check:
                        signature, manifest, expired, profile, downgrade, missing-file,
                        size, sha256, chunk, too-large
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of every wire-contract error."""


class MessageError(ProtocolError):
    """A message could not be decoded or does not follow its schema."""


class DesiredStateRefused(MessageError):
    """A desired state refused by the signature and counter rule (docs/security.md); reported by the device."""


class KeySetRefused(MessageError):
    """A key set refused by the rules of ``protocol/keyset.py``; the device's trust is unchanged."""


class ArtifactRejected(ProtocolError):
    """An artifact failed one verification check; nothing on disk was changed."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail
        super().__init__(f"artifact rejected ({reason}): {detail}")
