"""`cloud-hub broker-config` (a Mosquitto configuration that confines every device) and `cloud-hub devices
rotate-mqtt` (a device's new MQTT password). Both work on the hub's state directory (STATE/mqtt, see
cloud_hub/mqtt_auth.py), which a running hub and its brokers follow: the embedded broker rereads the password
file when it changes, a linked Mosquitto gets SIGHUP."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cloud_hub.cli import StateDir, app, devices_app, err, fail
from cloud_hub.mqtt_auth import MqttUsers, write_mosquitto_config
from cloud_hub.tls_serve import mosquitto_tls_listeners
from edge_agent.errors import ConfigError
from edge_agent.protocol.atomic import atomic_write_bytes
from edge_agent.protocol.topics import DEFAULT_ROOT, valid_device_id


def _listener(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise fail(f"--listen {text!r}: write it as HOST:PORT, e.g. 0.0.0.0:1883")
    return host, int(port)


@app.command("broker-config")
def broker_config(
    out: Annotated[Path, typer.Option(help="Directory for mosquitto.conf, acl and passwd")],
    state_dir: StateDir = Path("hub-state"),
    listen: Annotated[
        list[str] | None, typer.Option(help="Listener HOST:PORT; repeatable (default 127.0.0.1:1883)")
    ] = None,
    topic_root: Annotated[str, typer.Option(help="MQTT topic root (as `serve --topic-root`)")] = DEFAULT_ROOT,
    pid_file: Annotated[
        Path | None, typer.Option(help="Mosquitto's pid file, for the reload on changes (default: OUT/mosquitto.pid)")
    ] = None,
    tls_listen: Annotated[
        list[str] | None,
        typer.Option(
            help="TLS listener HOST:PORT (mqtts://, e.g. 0.0.0.0:8883); repeatable. Without --listen, the broker "
            "then has no plain listener"
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="PEM certificate of the TLS listeners (tls init: server.pem)")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key for --tls-cert")] = None,
    tls_ca: Annotated[
        Path | None, typer.Option(help="PEM CA that checks client certificates (tls init: ca.pem)")
    ] = None,
    require_certificate: Annotated[
        bool, typer.Option(help="TLS clients must present a certificate signed by --tls-ca (mTLS), besides a password")
    ] = False,
    replica: Annotated[
        list[str] | None,
        typer.Option(
            help="A hub replica's name (serve --replica NAME); repeatable: each gets the MQTT user edgefed-hub.NAME "
            "(the hub's password) with the hub's rights, since Mosquitto ties a client id to its user"
        ),
    ] = None,
) -> None:
    """Write a Mosquitto configuration: no anonymous clients, the hub's password file (kept in step with
    enrollment and removal: rewritten, then SIGHUP to Mosquitto) and an ACL that confines each device
    to its own topics. Run `mosquitto -c OUT/mosquitto.conf -d` and `cloud-hub serve --broker mqtt://...`."""
    listeners = [_listener(item) for item in listen or ([] if tls_listen else ["127.0.0.1:1883"])]
    tls = ""
    try:
        if tls_listen:
            if tls_cert is None or tls_key is None:
                raise ConfigError("--tls-listen needs --tls-cert and --tls-key (cloud-hub tls init DIR writes "
                                  "DIR/server.pem and DIR/server.key)")  # fmt: skip
            tls = mosquitto_tls_listeners([_listener(i) for i in tls_listen], tls_cert, tls_key, tls_ca,
                                          require_certificate)  # fmt: skip
        elif tls_cert or tls_key or tls_ca or require_certificate:
            raise ConfigError("--tls-cert, --tls-key, --tls-ca and --require-certificate are for --tls-listen "
                              "HOST:PORT; add one")  # fmt: skip
        for name in replica or []:
            if not valid_device_id(name):
                raise ConfigError(f"--replica {name!r}: a replica's name is letters, digits, '.', '_' and '-'")
        conf = write_mosquitto_config(MqttUsers(state_dir), out, listeners, topic_root, pid_file, tls, replica or [])
    except (OSError, ConfigError) as exc:
        raise fail(exc) from None
    err.print(f"wrote {conf} (with {out / 'acl'} and {out / 'passwd'}, 0600)")


@devices_app.command("rotate-mqtt")
def rotate_mqtt(
    device_id: Annotated[str, typer.Argument(help="The device whose MQTT password to replace")],
    out: Annotated[Path, typer.Option(help="Write the new password here (0600); it is never printed")],
    state_dir: StateDir = Path("hub-state"),
) -> None:
    """Give a device a new MQTT password; its old one stops working at once (Mosquitto rereads its password
    file on the reload, the embedded broker on the next connection). Put the new one on the device with
    `edge-agent init ... --mqtt-password-file`, or re-enroll the device instead (`cloud-hub devices
    enroll-token --reenroll ID`: each enrollment issues a new password)."""
    users = MqttUsers(state_dir)
    if device_id not in users.users():
        raise fail(f"{device_id!r} has no MQTT credentials in {users.passwd}; enroll it first")
    if out.exists():
        raise fail(f"{out} exists; give a new path")
    try:
        password = users.issue(device_id)
        atomic_write_bytes(out, password.encode(), mode=0o600)
    except (OSError, ValueError) as exc:
        raise fail(exc) from None
    err.print(f"{device_id}: new MQTT password in {out}")
