"""`cloud-hub tls init`: a development CA, a server certificate and per-device client certificates.

    DIR/ca.pem, DIR/ca.key            the CA (key 0600): give ca.pem to every client (--broker-ca, --ca, --cloud-ca)
    DIR/server.pem, DIR/server.key    the hub's certificate (--tls-cert/--tls-key): gRPC, admin API and MQTT
    DIR/devices/ID.pem, ID.key        a client certificate per device (CN = the device id), for mTLS brokers

Keys are ECDSA P-256. Every file is written crash-safe (``atomic_write_bytes``: a temporary file, fsync,
rename, fsync of the directory); the temporary file is created 0600, so a private key is never readable
by others, not even for a moment (certificates are then made 0644).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.errors import ConfigError
from edge_agent.protocol.atomic import atomic_write_bytes
from edge_agent.protocol.topics import valid_device_id

CA_DAYS = 3650
LEAF_DAYS = 825
ALWAYS_HOSTS = ("localhost", "127.0.0.1")  # the hub reaches its own admin API and broker on these


@dataclass
class TlsFiles:
    """What `tls init` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    hosts: list[str]
    devices: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # id → (cert, key)

    def as_dict(self) -> dict[str, object]:
        return {
            "ca": str(self.ca_cert),
            "ca_key": str(self.ca_key),
            "server_cert": str(self.server_cert),
            "server_key": str(self.server_key),
            "hosts": self.hosts,
            "devices": {d: {"cert": str(c), "key": str(k)} for d, (c, k) in self.devices.items()},
        }


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def check_host(host: str) -> str:
    """A host name or IP address for a certificate's SAN, or a ConfigError naming --host."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if (
        not host
        or len(host) > 253
        or not all(
            0 < len(label) <= 63
            and label.replace("-", "").replace("_", "").isalnum()
            and label.isascii()
            and (label != "*" or i == 0)
            for i, label in enumerate(labels)
        )
    ):
        raise ConfigError(
            f"--host {host!r}: not a host name or IP address; e.g. --host hub.example.com --host 10.0.0.5"
        )
    return host


class _Issuer:
    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.key, self.cert = key, cert

    def issue(self, name: str, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) of a new leaf for ``name``."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _new_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def tls_init(
    directory: Path, hosts: list[str], devices: list[str], force: bool = False, ca_name: str = "edgefed development CA"
) -> TlsFiles:
    """Create the CA, the server certificate for ``hosts`` (plus localhost and 127.0.0.1) and one client
    certificate per device id in ``directory``. ConfigError, before anything is written, for a bad host or
    device id, or an existing CA without ``force``."""
    names = list(dict.fromkeys([check_host(h) for h in hosts] + list(ALWAYS_HOSTS)))
    for device in devices:
        if not valid_device_id(device):
            raise ConfigError(f"--device {device!r}: not a device id; use letters, digits, '.', '_' and '-'")
    files = TlsFiles(
        directory / "ca.pem", directory / "ca.key", directory / "server.pem", directory / "server.key", names
    )
    if not force and (files.ca_cert.exists() or files.ca_key.exists()):
        raise ConfigError(
            f"{files.ca_cert} already exists: a CA is there, and replacing it makes every certificate it "
            "signed stop verifying; pass --force to replace it, or choose another directory"
        )
    (directory / "devices").mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _new_ca(ca_name)
    atomic_write_bytes(files.ca_key, _key_pem(ca_key), 0o600)
    atomic_write_bytes(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    issuer = _Issuer(ca_key, ca_cert)
    cert_pem, key_pem = issuer.issue(names[0], [_san(h) for h in names], ExtendedKeyUsageOID.SERVER_AUTH)
    atomic_write_bytes(files.server_key, key_pem, 0o600)
    atomic_write_bytes(files.server_cert, cert_pem, 0o644)
    for device in dict.fromkeys(devices):
        cert_pem, key_pem = issuer.issue(device, [], ExtendedKeyUsageOID.CLIENT_AUTH)
        pair = (directory / "devices" / f"{device}.pem", directory / "devices" / f"{device}.key")
        atomic_write_bytes(pair[1], key_pem, 0o600)
        atomic_write_bytes(pair[0], cert_pem, 0o644)
        files.devices[device] = pair
    return files
