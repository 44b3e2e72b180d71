"""TLS contexts for the clients (MQTT over ``mqtts://``), with errors that name the flag and the fix.

A client context verifies the server's certificate against ``ca_file`` (or the system's CAs) and checks
its host name; ``cert_file``/``key_file`` add a client certificate for brokers that require one (mTLS).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TypedDict

from edge_agent.errors import ConfigError


class BrokerTls(TypedDict, total=False):
    """AgentConfig's TLS files for an mqtts:// broker (--broker-ca, --broker-cert, --broker-key)."""

    broker_ca: str | None
    broker_cert: str | None
    broker_key: str | None


class AgentTls(BrokerTls, total=False):
    """... and the CA of a grpcs:// cloud (--cloud-ca)."""

    cloud_ca: str | None


def check_pem(path: str | Path, flag: str, what: str, marker: bytes = b"-----BEGIN ") -> None:
    """A readable PEM file holding ``marker``, or a ConfigError naming ``flag`` and what to give instead."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{flag} {path}: no such file; give {what}") from None
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot be read ({exc.strerror or exc}); give {what}") from None
    if marker not in data:
        raise ConfigError(
            f"{flag} {path}: not a PEM file{' with a certificate' if b'CERT' in marker else ''}; give {what}"
        )


def check_key_pair(cert_file: str | Path, key_file: str | Path, cert_flag: str, key_flag: str) -> None:
    """``cert_file`` and ``key_file`` are PEM, and the key is the certificate's; a ConfigError naming the flags."""
    check_pem(cert_file, cert_flag, "a PEM certificate (cloud-hub tls init writes them)", b"-----BEGIN CERTIFICATE")
    check_pem(key_file, key_flag, f"the PEM private key of {cert_flag}", b"PRIVATE KEY-----")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(
            f"{cert_flag} {cert_file} and {key_flag} {key_file} do not go together ({exc}); give a "
            "certificate and its own private key"
        ) from None


def client_context(
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
    *,
    ca_flag: str = "broker_ca",
    cert_flag: str = "broker_cert",
    key_flag: str = "broker_key",
) -> ssl.SSLContext:
    """A context that verifies the server (``ca_file`` or the system's CAs) and its host name."""
    if ca_file is not None:
        check_pem(
            ca_file,
            ca_flag,
            "the PEM CA certificate that signed the server's certificate (ca.pem of cloud-hub tls init)",
            b"-----BEGIN CERTIFICATE",
        )
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(f"{ca_flag} {ca_file}: not a usable PEM CA certificate ({exc})") from None
    if (cert_file is None) != (key_file is None):
        raise ConfigError(
            f"{cert_flag} and {key_flag} go together: give both (a client certificate and its key) or neither"
        )
    if cert_file is not None and key_file is not None:
        check_key_pair(cert_file, key_file, cert_flag, key_flag)
        context.load_cert_chain(str(cert_file), str(key_file))
    return context


def verify_failure(exc: BaseException) -> str | None:
    """The reason when ``exc`` (or what it wraps) is a failed certificate check; None otherwise."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {seen.verify_message}" if seen.verify_message else str(seen)
        reason = getattr(seen, "reason", None)
        seen = reason if isinstance(reason, BaseException) else seen.__cause__ or seen.__context__
    return None
