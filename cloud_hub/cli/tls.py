"""`cloud-hub tls init`: a development CA, the hub's server certificate and per-device client certificates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cloud_hub.cli import AsJson, app, err, fail
from cloud_hub.tls_init import tls_init
from edge_agent.errors import ConfigError

tls_app = typer.Typer(help="TLS certificates for MQTT, gRPC and the admin API (docs/security.md, TLS).",
                      no_args_is_help=True)  # fmt: skip
app.add_typer(tls_app, name="tls")


@tls_app.command("init")
def init(
    directory: Annotated[Path, typer.Argument(help="Directory for ca.pem/ca.key, server.pem/server.key, devices/")],
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            help="Host name or IP address clients reach the hub by (the server certificate's names); repeatable. "
            "localhost and 127.0.0.1 are always included",
        ),
    ] = None,
    device: Annotated[
        list[str] | None,
        typer.Option("--device", help="Also make a client certificate for this device id (CN = ID); repeatable"),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing CA (what it signed stops verifying)")] = False,
    as_json: AsJson = False,
) -> None:
    """Create a development CA (DIR/ca.pem, ca.key), a server certificate for --host names (DIR/server.pem,
    server.key) and a client certificate per --device (DIR/devices/ID.pem, ID.key). Private keys are 0600.
    Then: `cloud-hub serve --tls-cert DIR/server.pem --tls-key DIR/server.key --admin-tls --broker-tls-port
    8883`, and give DIR/ca.pem to clients (edge-agent --broker-ca/--cloud-ca/--ca, EDGEFED_HUB_CA)."""
    try:
        files = tls_init(directory, host or [], device or [], force=force)
    except (ConfigError, OSError) as exc:
        raise fail(exc) from None
    if as_json:
        print(json.dumps(files.as_dict(), indent=2))
        return
    err.print(f"CA: {files.ca_cert} (key {files.ca_key}, 0600; keep it off the hub)")
    err.print(f"server certificate for {', '.join(files.hosts)}: {files.server_cert} (key {files.server_key})")
    for device_id, (cert, key) in files.devices.items():
        err.print(f"client certificate for {device_id}: {cert} (key {key})")
