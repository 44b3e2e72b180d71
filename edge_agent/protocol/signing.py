"""Ed25519 signing (hub/compiler side) and verification (agent side) of manifests."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
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
    """The public keys an agent accepts, by key id."""

    keys: dict[str, Ed25519PublicKey]

    @classmethod
    def from_dir(cls, directory: str | Path) -> TrustStore:
        keys = [load_public_key(p) for p in sorted(Path(directory).glob("*.pub"))]
        return cls({key_id(k): k for k in keys})


def sign_document(document: dict[str, Any], private_key: Ed25519PrivateKey) -> dict[str, str]:
    """The signature record over the canonical JSON of ``document``."""
    signature = private_key.sign(canonical_json(document))
    return {
        "alg": ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "sig": base64.b64encode(signature).decode(),
    }


def verify_document(document: dict[str, Any], signature: Any, trust: TrustStore) -> None:
    """Raise ArtifactRejected('signature') unless a trusted key signed this exact document."""
    if not isinstance(signature, dict) or signature.get("alg") != ALGORITHM:
        raise ArtifactRejected("signature", "signature record missing or not ed25519")
    public_key = trust.keys.get(str(signature.get("key_id")))
    if public_key is None:
        raise ArtifactRejected("signature", f"signed by untrusted key {signature.get('key_id')!r}")
    try:
        public_key.verify(base64.b64decode(str(signature.get("sig")), validate=True), canonical_json(document))
    except (InvalidSignature, ValueError):
        raise ArtifactRejected("signature", "signature does not match the manifest") from None
