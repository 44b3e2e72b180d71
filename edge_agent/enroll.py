"""`edge-agent enroll`: trade a single-use enrollment token for this device's configuration.

The hub is authenticated before anything it answers is stored (docs/security.md, "Enrollment"): by TLS
(``https://`` verified with ``--ca`` or the system's CAs), and/or by the fingerprint the token carries
(``SECRET.FINGERPRINT``, the sha256 of the hub key): the answer must hold that hub key and be signed with
it, for this token and this device id. A hub authenticated by neither is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edge_agent.config import AgentConfig
from edge_agent.desired_guard import install_hub_key
from edge_agent.errors import ConfigError
from edge_agent.protocol.errors import ArtifactRejected, KeySetRefused
from edge_agent.protocol.keyset import KeySet
from edge_agent.protocol.signing import TrustStore, key_id, public_key_from_pem, verify_document
from edge_agent.tls import AgentTls
from edge_agent.trust import enrollment_keyset, store_keyset


def split_token(token: str) -> tuple[str, str | None]:
    """``SECRET.FINGERPRINT`` → (secret, fingerprint); a token without one → (token, None)."""
    secret, dot, fingerprint = token.strip().partition(".")
    return secret, (fingerprint.lower() if dot else None)


def _tls_context(hub: str, ca: Path | None) -> ssl.SSLContext | None:
    if not hub.startswith("https://"):
        if ca is not None:
            raise ConfigError(f"--ca is given but {hub} is not https://; enroll over TLS: --hub https://…")
        return None
    try:
        return ssl.create_default_context(cafile=str(ca) if ca else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--ca {ca}: not a readable PEM CA certificate ({exc})") from None


def request_enrollment(hub: str, token: str, device_id: str, profile: str, timeout_s: float = 30.0,
                       context: ssl.SSLContext | None = None) -> dict[str, Any]:  # fmt: skip
    body = json.dumps({"token": token, "device_id": device_id, "profile": profile}).encode()
    req = urllib.request.Request(f"{hub.rstrip('/')}/v1/enroll", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=context) as response:
            answer = json.loads(response.read(1 << 20))
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read(1 << 16)).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        raise ConfigError(f"the hub refused enrollment ({exc.code}): {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        if isinstance(getattr(exc, "reason", exc), ssl.SSLCertVerificationError):
            raise ConfigError(f"the hub at {hub} is not the one --ca names (its TLS certificate does not verify: "
                              f"{getattr(exc, 'reason', exc)}); refusing it. Give --ca the CA that signed the "
                              "hub's certificate") from None  # fmt: skip
        raise ConfigError(f"cannot reach the hub at {hub}: {exc}") from None
    except ValueError:
        raise ConfigError(f"the hub at {hub} answered enrollment with something that is not JSON") from None
    if not isinstance(answer, dict):
        raise ConfigError(f"the hub at {hub} answered enrollment with something that is not a JSON object")
    return answer


def verify_answer(answer: dict[str, Any], secret: str, fingerprint: str, device_id: str) -> None:
    """ConfigError unless ``answer`` holds the hub key with ``fingerprint``, is signed by it, and was made
    for this token and device id."""
    refused = "refusing this hub (not the one the token was issued by, or the answer was altered)"
    try:
        public_key = public_key_from_pem(str(answer.get("hub_key", "")).encode(), "hub_key")
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"the hub's answer holds no valid hub key; {refused}") from None
    found = hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()
    if not hmac.compare_digest(found, fingerprint):
        raise ConfigError(f"the hub's key has fingerprint {found[:16]}…, the token pins {fingerprint[:16]}…; {refused}")
    document = {k: v for k, v in answer.items() if k != "answer_signature"}
    try:
        verify_document(document, answer.get("answer_signature"), TrustStore({key_id(public_key): public_key}))
    except ArtifactRejected:
        raise ConfigError(f"the hub's answer is not signed by the pinned hub key; {refused}") from None
    ours = hashlib.sha256(secret.encode()).hexdigest()
    if answer.get("token_sha256") != ours or answer.get("device_id") != device_id:
        raise ConfigError(f"the hub's signed answer was made for another token or device; {refused}")


def enroll(hub: str, token: str, device_id: str, profile: str, state_dir: Path, ca: Path | None = None,
           broker_tls: AgentTls | None = None) -> AgentConfig:  # fmt: skip
    """Enroll, authenticate the answer, then write the trusted keys, the hub's desired-state key
    (``hub-keys/hub.pub``) and ``agent.json`` (0640) into ``state_dir``. ``broker_tls``: AgentConfig's
    ``broker_ca``/``broker_cert``/``broker_key`` (``--broker-ca`` ...) for an mqtts:// broker."""
    secret, fingerprint = split_token(token)
    context = _tls_context(hub, ca)
    if context is None and not fingerprint:
        raise ConfigError(f"cannot authenticate the hub at {hub}: give the token with its fingerprint "
                          "(SECRET.FINGERPRINT, as 'cloud-hub devices enroll-token' prints it) or enroll over "
                          "https:// (--ca PEM for a private CA)")  # fmt: skip
    answer = request_enrollment(hub, secret, device_id, profile, context=context)
    if fingerprint:
        verify_answer(answer, secret, fingerprint, device_id)
    try:
        config = AgentConfig(device_id=answer["device_id"], profile=answer["profile"], broker=answer["broker"],
                             cloud=answer.get("cloud"), cloud_token=answer.get("cloud_token"),
                             topic_root=answer.get("topic_root", AgentConfig.topic_root),
                             mqtt_username=answer.get("mqtt_username"),  # (a hub before issue 14 sends none)
                             mqtt_password=answer.get("mqtt_password"), **(broker_tls or {}))  # fmt: skip
    except KeyError as exc:
        raise ConfigError(f"the hub's answer lacks {exc}") from None
    keyset = _answer_keyset(answer)  # every check before anything is written
    state_dir.mkdir(parents=True, exist_ok=True)
    install_hub_key(state_dir, str(answer["hub_key"]).encode())  # (for tools; the key set's roots decide)
    store_keyset(state_dir, keyset)
    config.save(state_dir)
    return config


def _answer_keyset(answer: dict[str, Any]) -> KeySet:
    """The signed key set the answer carries, signed by its (authenticated) hub key and trusting at least
    one artifact key: the hub's keys reach the device only through it, never as a bare answer (the
    answer's ``trusted_keys`` are for agents older than key sets)."""
    if "keyset" not in answer:
        raise ConfigError("the hub's answer carries no signed key set: the hub is older than this agent; "
                          "upgrade the hub, or set the device up with 'edge-agent init --trust KEY.pub "
                          "--hub-key hub.pub'")  # fmt: skip
    try:
        hub_key = public_key_from_pem(str(answer.get("hub_key", "")).encode(), "hub_key")
        keyset = enrollment_keyset(answer["keyset"], hub_key)
    except (ValueError, UnsupportedAlgorithm, KeySetRefused) as exc:
        raise ConfigError(f"the hub's answer: {exc}; refusing this hub") from None
    if not keyset.artifact_trust().keys:
        raise ConfigError("the hub's key set trusts no artifact-signing key; add one with 'cloud-hub keys add KEY.pub'")
    return keyset
