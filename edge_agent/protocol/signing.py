"""Ed25519 signing (hub/compiler side) and verification (agent side) of manifests."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.protocol.canonical import canonical_json, sha256_hex
from edge_agent.protocol.errors import ArtifactRejected

ALGORITHM = "ed25519"


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short, stable id of a public key: the first 16 hex digits of the sha256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sha256_hex(raw)[:16]


def generate_keypair(directory: str | Path, name: str = "signing") -> tuple[Path, Path]:
    """Write NAME.key (PKCS#8 PEM, mode 0600) and NAME.pub (PEM) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    key_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return key_path, pub_path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key; create one with 'model-compiler keygen'")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    return public_key_from_pem(Path(path).read_bytes(), str(path))


def public_key_from_pem(pem: bytes, source: str = "the key") -> Ed25519PublicKey:
    """The Ed25519 public key in ``pem``; ValueError naming ``source`` when it is not one."""
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{source}: not an Ed25519 public key")
    return key


@dataclass(frozen=True)
class TrustStore:
    """The public keys an agent accepts, by key id; ``revoked``: key ids refused by name (the key set's)."""

    keys: dict[str, Ed25519PublicKey]
    revoked: frozenset[str] = frozenset()

    @classmethod
    def from_dir(cls, directory: str | Path) -> TrustStore:
        """Every ``*.pub`` in ``directory``; ValueError naming the file that is not an Ed25519 public key
        (a private key, garbage) and how to fix it."""
        keys = [_trusted_key(p) for p in sorted(Path(directory).glob("*.pub"))]
        return cls({key_id(k): k for k in keys})


def _trusted_key(path: Path) -> Ed25519PublicKey:
    try:
        return public_key_from_pem(path.read_bytes(), str(path))
    except (ValueError, TypeError, UnsupportedAlgorithm, OSError) as exc:
        reason = str(exc).split(". See", 1)[0].strip()
        raise ValueError(
            f"{path}: not a usable trusted key ({reason}); replace it with the signer's signing.pub "
            "(model-compiler keygen) or remove it"
        ) from None


def check_public_key_file(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key in ``path`` (for ``--trust``); ValueError saying what it is instead: a
    missing file, a *private* key (never to be copied onto a device), or not a PEM public key."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"--trust {path}: no such file; give the signer's public key (signing.pub)") from None
    except OSError as exc:
        raise ValueError(f"--trust {path}: cannot be read ({exc.strerror})") from None
    if b"PRIVATE KEY-----" in data:
        raise ValueError(
            f"--trust {path}: that is a private key; give the .pub (e.g. signing.pub next to it). "
            "Nothing was copied: keep the private key off devices"
        )
    try:
        return public_key_from_pem(data, f"--trust {path}")
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        reason = str(exc).split(". See", 1)[0].strip()
        raise ValueError(
            f"--trust {path}: not an Ed25519 public key in PEM ({reason}); give the signer's signing.pub"
        ) from None


def sign_document(document: dict[str, Any], private_key: Ed25519PrivateKey) -> dict[str, str]:
    """The signature record over the canonical JSON of ``document``."""
    signature = private_key.sign(canonical_json(document))
    return {
        "alg": ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "sig": base64.b64encode(signature).decode(),
    }


def verify_document(document: dict[str, Any], signature: Any, trust: TrustStore) -> None:
    """Raise ArtifactRejected('signature') unless a trusted key signed this exact document.

    The record must be exactly what ``sign_document`` writes (the three fields, strings, the signature
    in canonical base64 of 64 bytes): a record that verifies but was not written by the signer (an
    extra field, a base64 spelling with other unused bits) is refused, so it is not malleable."""
    if not isinstance(signature, dict) or signature.get("alg") != ALGORITHM:
        raise ArtifactRejected("signature", "signature record missing or not ed25519")
    if set(signature) != {"alg", "key_id", "sig"} or not all(isinstance(v, str) for v in signature.values()):
        raise ArtifactRejected("signature", "signature record must hold exactly the strings alg, key_id and sig")
    if signature["key_id"] in trust.revoked:
        raise ArtifactRejected("signature", f"signed by revoked key {signature['key_id']!r}")
    public_key = trust.keys.get(signature["key_id"])
    if public_key is None:
        raise ArtifactRejected("signature", f"signed by untrusted key {signature['key_id']!r}")
    try:
        raw = base64.b64decode(signature["sig"], validate=True)
        if len(raw) != 64 or base64.b64encode(raw).decode() != signature["sig"]:
            raise ValueError("not the canonical base64 of a 64-byte signature")
        public_key.verify(raw, canonical_json(document))
    except (InvalidSignature, ValueError):
        raise ArtifactRejected("signature", "signature does not match the manifest") from None
