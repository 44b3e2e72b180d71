"""TLS on the hub's side: the admin API's context (uvicorn serves https with it: cloud_hub/api/serve.py),
the embedded broker's TLS listener, and the context the hub's own MQTT client uses (docs/security.md,
"TLS").

One certificate pair (``serve --tls-cert/--tls-key``, e.g. ``server.pem``/``server.key`` of ``cloud-hub tls
init``) serves gRPC, the admin API (``--admin-tls``) and the embedded broker's TLS listener
(``--broker-tls-port``).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from edge_agent.errors import ConfigError
from edge_agent.tls import check_key_pair, check_pem, client_context


def server_context(
    cert: Path,
    key: Path,
    ca: Path | None = None,
    require_client_cert: bool = False,
    cert_flag: str = "--tls-cert",
    key_flag: str = "--tls-key",
) -> ssl.SSLContext:
    """A server context for ``cert``/``key`` (TLS 1.2 or later); with ``require_client_cert`` clients must
    present a certificate signed by ``ca``. ConfigError naming the flag for a missing or garbage file."""
    check_key_pair(cert, key, cert_flag, key_flag)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    if require_client_cert:
        if ca is None:
            raise ConfigError("a client certificate is required but no CA is given to check it; give --tls-ca PEM")
        check_pem(ca, "--tls-ca", "the PEM CA that signed the clients' certificates", b"-----BEGIN CERTIFICATE")
        context.load_verify_locations(cafile=str(ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def admin_context(enabled: bool, cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The admin API's context with ``--admin-tls`` (None without); ConfigError when the pair is missing."""
    if not enabled:
        return None
    if cert is None or key is None:
        raise ConfigError("--admin-tls needs a certificate: give --tls-cert and --tls-key (cloud-hub tls init)")
    return server_context(cert, key)


def pinned_context(cert: Path) -> ssl.SSLContext:
    """A client context that trusts exactly the certificate ``cert`` (no host name check): the hub's own
    connection to its embedded broker's TLS listener, which serves that certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the leaf itself is the trust anchor
    context.load_verify_locations(cafile=str(cert))
    return context


def hub_mqtt_context(
    broker_url: str, ca: Path | None, cert: Path | None, key: Path | None, own_cert: Path | None
) -> ssl.SSLContext | None:
    """The context of the hub's MQTT client: None for ``mqtt://``; else verified with ``--broker-ca`` (or the
    system's CAs), or pinned to ``own_cert`` when the broker is the hub's own embedded one."""
    if not broker_url.startswith("mqtts://"):
        return None
    if ca is None and own_cert is not None:
        return pinned_context(own_cert)
    return client_context(ca, cert, key, ca_flag="--broker-ca", cert_flag="--broker-cert", key_flag="--broker-key")


def check_serve_flags(
    broker: str | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    admin_tls: bool,
    broker_tls_port: int | None,
    broker_tls_only: bool,
    broker_ca: Path | None,
    broker_cert: Path | None,
    broker_key: Path | None,
) -> None:
    """`cloud-hub serve`'s TLS flags, checked before anything starts: ConfigError naming the flag and the fix."""
    pair = "--tls-cert and --tls-key (cloud-hub tls init DIR writes DIR/server.pem and DIR/server.key)"
    for flag, wanted in (("--admin-tls", admin_tls), ("--broker-tls-port", broker_tls_port is not None)):
        if wanted and (tls_cert is None or tls_key is None):
            raise ConfigError(f"{flag} needs a certificate: give {pair}")
    if broker_tls_only and broker_tls_port is None:
        raise ConfigError("--broker-tls-only needs --broker-tls-port PORT: the embedded broker must listen somewhere")
    if broker is not None and (broker_tls_port is not None or broker_tls_only):
        raise ConfigError(
            "--broker-tls-port and --broker-tls-only are for the embedded broker; with --broker "
            "configure TLS on that broker (cloud-hub broker-config --tls-listen)"
        )
    if tls_cert is not None and tls_key is not None:
        check_key_pair(tls_cert, tls_key, "--tls-cert", "--tls-key")
    hub_tls = (broker or "").startswith("mqtts://") or (broker is None and broker_tls_only)
    if not hub_tls and (broker_ca or broker_cert or broker_key):
        raise ConfigError(
            "--broker-ca, --broker-cert and --broker-key are for a TLS broker: give --broker "
            "mqtts://host:port (or --broker-tls-only for the embedded one)"
        )
    if hub_tls:
        client_context(
            broker_ca,
            broker_cert,
            broker_key,
            ca_flag="--broker-ca",
            cert_flag="--broker-cert",
            key_flag="--broker-key",
        )


def mosquitto_tls_listeners(listeners: list[tuple[str, int]], cert: Path, key: Path, ca: Path | None,
                            require_certificate: bool) -> str:  # fmt: skip
    """Mosquitto ``listener`` blocks with TLS (cert/key, and the CA that checks client certificates)."""
    check_key_pair(cert, key, "--tls-cert", "--tls-key")
    if require_certificate and ca is None:
        raise ConfigError("--require-certificate needs --tls-ca PEM: the CA that signed the devices' certificates")
    if ca is not None:
        check_pem(ca, "--tls-ca", "the PEM CA that signed the clients' certificates", b"-----BEGIN CERTIFICATE")
    blocks = []
    for host, port in listeners:
        lines = [f"listener {port} {host}", f"certfile {cert.resolve()}", f"keyfile {key.resolve()}",
                 "tls_version tlsv1.2"]  # fmt: skip
        if ca is not None:
            lines.append(f"cafile {ca.resolve()}")
        lines.append(f"require_certificate {'true' if require_certificate else 'false'}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)
