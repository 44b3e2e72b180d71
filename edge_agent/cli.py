"""edge-agent: set up a device, run the agent daemon, and manage local models (also offline)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography.hazmat.primitives import serialization
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from device_profiles import ProfileError, get_profile, load_profiles
from device_profiles.detect import detect_profile
from edge_agent.config import STATE_DIR_ENV, AgentConfig, default_state_dir
from edge_agent.errors import ConfigError, EdgefedError
from edge_agent.protocol.atomic import atomic_write_bytes
from edge_agent.protocol.errors import ProtocolError
from edge_agent.protocol.signing import TrustStore, check_public_key_file
from edge_agent.store import ModelStore
from edge_agent.tls import AgentTls, BrokerTls, check_pem, client_context
from edge_agent.trust import artifact_trust

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
err = Console(stderr=True, soft_wrap=True)  # messages are never cut or wrapped mid-word
StateDir = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        envvar=STATE_DIR_ENV,
        help="State directory (default /var/lib/edgefed or ~/.local/share/edgefed)",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON for scripts")]


def _state(state_dir: Path | None) -> Path:
    return state_dir or default_state_dir()


def _fail(exc: Exception) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(str(exc))}")
    return typer.Exit(2)


@app.command("detect-profile")
def detect_profile_command(as_json: AsJson = False) -> None:
    """Detect this device's profile (device tree, Jetson release file, CPU flags, nvidia-smi)."""
    found = detect_profile(load_profiles())
    if found is None:
        raise _fail(ProfileError("<host>", "-", "no profile matches this machine", "add a profile file for it"))
    if as_json:
        print(json.dumps({"profile": found.profile.id, "reasons": list(found.reasons)}))
        return
    print(found.profile.id)
    for reason in found.reasons:
        err.print(f"  because: {reason}")


@app.command()
def init(
    device_id: Annotated[str, typer.Option(help="This device's id (letters, digits, '.', '_', '-')")],
    trust: Annotated[list[Path], typer.Option(help="Public signing key (.pub) to trust; repeatable")],
    broker: Annotated[
        str, typer.Option(help="MQTT broker URL: mqtt://host:port, or mqtts://host:port (TLS, port 8883)")
    ] = "mqtt://127.0.0.1:1883",
    cloud: Annotated[str | None, typer.Option(help="Cloud inference URL grpc://host:port or grpcs://host:port")] = None,
    cloud_token: Annotated[str | None, typer.Option(help="Bearer token from `cloud-hub devices token`")] = None,
    cloud_ca: Annotated[str | None, typer.Option(help="CA bundle for a grpcs:// cloud")] = None,
    profile: Annotated[str | None, typer.Option(help="Profile id; default: detected")] = None,
    spool_max_calls: Annotated[
        int, typer.Option(min=1, help="Telemetry spool cap: calls kept while the hub is unreachable")
    ] = AgentConfig.spool_max_calls,
    spool_full: Annotated[
        str, typer.Option(help="When the spool is full: drop_oldest or reject_new (both counted as dropped)")
    ] = AgentConfig.spool_full,
    hub_key: Annotated[
        Path | None,
        typer.Option(
            help="The hub's desired-state key (its STATE/hub-key/hub.pub): desired states must then "
            "be signed by it, and signed rollbacks are honoured"
        ),
    ] = None,
    mqtt_password_file: Annotated[
        Path | None,
        typer.Option(
            help="File holding this device's MQTT password (from `cloud-hub devices mqtt-password`); the "
            "username is the device id. Without it the agent connects anonymously"
        ),
    ] = None,
    broker_ca: Annotated[
        Path | None, typer.Option(help="PEM CA of an mqtts:// broker's certificate (default: the system's CAs)")
    ] = None,
    broker_cert: Annotated[
        Path | None, typer.Option(help="Client certificate (PEM) for an mqtts:// broker that requires one")
    ] = None,
    broker_key: Annotated[Path | None, typer.Option(help="PEM private key for --broker-cert")] = None,
    state_dir: StateDir = None,
) -> None:
    """Write the agent configuration and trusted keys into the state directory."""
    state = _state(state_dir)
    try:
        profile_id = profile or _detected()
        get_profile(profile_id)
        password = mqtt_password_file.read_text().strip() if mqtt_password_file is not None else None
        config = AgentConfig(device_id=device_id, profile=profile_id, broker=broker, cloud=cloud,
                             cloud_token=cloud_token, cloud_ca=cloud_ca, spool_max_calls=spool_max_calls,
                             spool_full=spool_full, mqtt_username=device_id if password else None,
                             mqtt_password=password or None, **_broker_tls(broker_ca, broker_cert,
                                                                           broker_key))  # fmt: skip
        checked = [(key, check_public_key_file(key)) for key in trust]  # all checked before anything is written
        if cloud_ca is not None:
            check_pem(Path(cloud_ca), "--cloud-ca", "the CA bundle (PEM) that signed the hub's gRPC certificate")
        if (state / "trust").is_dir():
            TrustStore.from_dir(state / "trust")  # a garbage .pub already there is named before writing
        (state / "trust").mkdir(parents=True, exist_ok=True)
        for key, public in checked:  # as NAME.pub: the agent trusts only *.pub files
            pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            atomic_write_bytes(state / "trust" / f"{key.stem}.pub", pem)
        TrustStore.from_dir(state / "trust")
        if hub_key is not None:
            from edge_agent.desired_guard import install_hub_key

            install_hub_key(state, hub_key.read_bytes())
        config.save(state)
    except (EdgefedError, ProfileError, OSError, ValueError) as exc:
        raise _fail(exc) from None
    err.print(f"configured {device_id} ({profile_id}) in {state}")


def _broker_tls(ca: Path | None, cert: Path | None, key: Path | None) -> BrokerTls:
    """AgentConfig's broker_ca/broker_cert/broker_key from the flags, each file checked (ConfigError naming it)."""
    client_context(ca, cert, key, ca_flag="--broker-ca", cert_flag="--broker-cert", key_flag="--broker-key")

    def absolute(path: Path | None) -> str | None:
        return str(path.resolve()) if path is not None else None

    return BrokerTls(broker_ca=absolute(ca), broker_cert=absolute(cert), broker_key=absolute(key))


def _detected() -> str:
    found = detect_profile(load_profiles())
    if found is None:
        raise ProfileError("<host>", "profile", "no profile matches this machine", "pass --profile ID")
    return found.profile.id


@app.command()
def enroll(
    hub: Annotated[str, typer.Option(help="Hub admin URL, e.g. http://hub.example:8080")],
    token: Annotated[str, typer.Option(help="Enrollment token from `cloud-hub devices enroll-token`")],
    device_id: Annotated[str | None, typer.Option(help="This device's id (default: the host name)")] = None,
    profile: Annotated[str | None, typer.Option(help="Profile id; default: detected")] = None,
    state_dir: StateDir = None,
    ca: Annotated[Path | None, typer.Option(help="PEM CA that signed the hub's certificate (https:// hubs)")] = None,
    broker_ca: Annotated[
        Path | None, typer.Option(help="PEM CA of the mqtts:// broker the hub names (default: the system's CAs)")
    ] = None,
    broker_cert: Annotated[
        Path | None, typer.Option(help="Client certificate (PEM) for an mqtts:// broker that requires one")
    ] = None,
    broker_key: Annotated[Path | None, typer.Option(help="PEM private key for --broker-cert")] = None,
    cloud_ca: Annotated[
        Path | None, typer.Option(help="PEM CA of the grpcs:// cloud the hub names (default: the system's CAs)")
    ] = None,
) -> None:
    """Register this device with the hub and store what it answers: broker and cloud endpoints, the
    device's cloud token and the hub's trusted signing keys. The hub is verified first: by the fingerprint
    the token carries (TOKEN.FINGERPRINT) and/or by TLS (https://, --ca)."""
    from edge_agent.enroll import enroll as do_enroll

    state = _state(state_dir)
    try:
        if cloud_ca is not None:  # every file checked before the single-use token is spent
            check_pem(cloud_ca, "--cloud-ca", "the CA bundle (PEM) that signed the hub's gRPC certificate")
        tls = AgentTls(**_broker_tls(broker_ca, broker_cert, broker_key),
                       cloud_ca=str(cloud_ca.resolve()) if cloud_ca is not None else None)  # fmt: skip
        config = do_enroll(hub, token, device_id or socket.gethostname(), profile or _detected(), state, ca,
                           broker_tls=tls)  # fmt: skip
    except (EdgefedError, ProfileError, OSError, ValueError) as exc:
        raise _fail(exc) from None
    err.print(f"enrolled {config.device_id} ({config.profile}) with {hub}; start the agent: edge-agent run")


@app.command("install-service")
def install_service(
    user: Annotated[str, typer.Option(help="System user the agent runs as")] = "edgefed",
    unit_path: Annotated[Path, typer.Option(help="Where to write the unit")] = Path(
        "/etc/systemd/system/edgefed-agent.service"
    ),
    dry_run: Annotated[bool, typer.Option(help="Only print the unit")] = False,
    state_dir: StateDir = None,
) -> None:
    """Write a systemd unit that runs `edge-agent run` (restart on failure, SIGTERM stop, hardened)."""
    from edge_agent.service import systemd_unit

    unit = systemd_unit(sys.executable, _state(state_dir), user)
    print(unit)
    if dry_run:
        return
    try:
        atomic_write_bytes(unit_path, unit.encode())
    except OSError as exc:
        raise _fail(ConfigError(f"cannot write {unit_path}: {exc}; run as root or pass --unit-path")) from None
    err.print(f"wrote {unit_path}; now: systemctl daemon-reload && systemctl enable --now {unit_path.stem}")


@app.command()
def run(
    state_dir: StateDir = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="Serve Prometheus metrics (spool counters, broker link, active models) at "
            "http://HOST:PORT/metrics; off unless given; needs prometheus-client",
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help="Address the metrics port listens on (0.0.0.0: every interface)")
    ] = "127.0.0.1",
) -> None:
    """Run the agent daemon until SIGTERM/SIGINT."""
    from edge_agent.agent import Agent

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s agent %(levelname)s %(name)s: %(message)s")
    state = _state(state_dir)
    try:
        agent = Agent(state, AgentConfig.load(state))
        if metrics_port is not None:
            from edge_agent.metrics import start_metrics_server

            server, _ = start_metrics_server(agent, metrics_port, metrics_host)
            err.print(f"metrics at http://{metrics_host}:{server.server_port}/metrics")
    except (EdgefedError, ProfileError, ValueError) as exc:  # ValueError: a bad key in STATE/trust
        raise _fail(exc) from None
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop_event.set())
    try:
        agent.run()
    except EdgefedError as exc:
        raise _fail(exc) from None


def _store_and_config(state_dir: Path | None) -> tuple[Path, ModelStore, AgentConfig]:
    state = _state(state_dir)
    return state, ModelStore(state / "models"), AgentConfig.load(state)


@app.command()
def install(path: Annotated[Path, typer.Argument(help="Artifact directory")], state_dir: StateDir = None) -> None:
    """Verify and install a signed artifact from disk, then activate it (offline / air-gapped devices)."""
    from edge_agent.agent import health_check

    try:
        state, store, config = _store_and_config(state_dir)
        profile = get_profile(config.profile)
        check = partial(health_check, profile=profile)
        before = {name: active.artifact_id for name in store.names() if (active := store.active(name))}
        trust = artifact_trust(state)  # the signed key set's keys less the revoked ones (edge_agent/trust.py)
        manifest = store.install(path, trust, profile, activate=True, check=check)
    except (EdgefedError, ProtocolError, ProfileError, OSError, ValueError) as exc:  # ValueError: a bad trusted key
        raise _fail(exc) from None
    what = f"{manifest.name}@{manifest.version} ({manifest.precision}, {manifest.artifact_id[:12]})"
    if before.get(manifest.name) == manifest.artifact_id:
        err.print(f"{what} was already installed and active: files verified, nothing changed")
    else:
        err.print(f"installed and activated {what}")


@app.command()
def models(state_dir: StateDir = None, as_json: AsJson = False) -> None:
    """Installed models and their active version."""
    store = ModelStore(_state(state_dir) / "models")
    rows: list[dict[str, Any]] = []
    for name in store.names():
        active = store.active(name)
        for m in store.versions(name):
            rows.append(
                {
                    "name": name,
                    "version": m.version,
                    "release": m.release,
                    "precision": m.precision,
                    "active": bool(active and active.version == m.version),
                }
            )
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("name", "version", "release", "precision", "active")
    for row in rows:
        table.add_row(row["name"], row["version"], str(row["release"]), row["precision"], "✓" if row["active"] else "")
    (Console() if sys.stdout.isatty() else Console(width=1000)).print(table)  # a pipe gets the whole table


@app.command()
def activate(model: Annotated[str, typer.Argument(help="NAME@VERSION")], state_dir: StateDir = None) -> None:
    """Switch the active version of a model to another installed version."""
    from edge_agent.desired_guard import record_override

    name, _, version = model.partition("@")
    try:
        record = ModelStore(_state(state_dir) / "models").activate(name, version)
        record_override(_state(state_dir), name, record.version, record.artifact_id)  # until the next desired state
    except (EdgefedError, OSError) as exc:
        raise _fail(exc) from None
    err.print(f"{name}: active {record.version} (previous {record.previous})")


@app.command()
def rollback(name: Annotated[str, typer.Argument(help="Model name")], state_dir: StateDir = None) -> None:
    """Switch a model to the newest installed release below the active one (again: further back). A
    running agent reports it to the hub within a second; the hub's next desired state replaces it."""
    from edge_agent.desired_guard import record_override

    try:
        record = ModelStore(_state(state_dir) / "models").rollback(name)
        record_override(_state(state_dir), name, record.version, record.artifact_id)  # until the next desired state
    except (EdgefedError, OSError) as exc:
        raise _fail(exc) from None
    err.print(f"{name}: active {record.version} (was {record.previous})")


@app.command()
def status(state_dir: StateDir = None) -> None:
    """Configuration, installed models and telemetry spool of this device."""
    from edge_agent.example_spool import ExampleSpool, spool_dir
    from edge_agent.telemetry import SPOOL_FILE, Spool

    state = _state(state_dir)
    try:
        config = AgentConfig.load(state)
    except EdgefedError as exc:
        raise _fail(exc) from None
    spool = Spool(state / SPOOL_FILE)
    store = ModelStore(state / "models")
    active = {n: (store.active(n).version if store.active(n) else None) for n in store.names()}  # type: ignore[union-attr]
    report = {
        "config": {**asdict(config), "cloud_token": "***" if config.cloud_token else None},
        "broker": _broker_status(state),
        "active": active,
        "spooled_calls": spool.pending_calls(),
        "dropped": spool.counter("dropped"),
        "budget_breaches": spool.counter("budget_breaches"),
        "spool_resets": spool.counter("spool_resets"),
        "hard_examples": ExampleSpool(spool_dir(state), create=False).status(),  # opt-in: all 0 unless an app kept some
    }
    print(json.dumps(report, indent=2))


def _broker_status(state: Path) -> dict[str, Any]:
    """The running agent's broker link, as it last wrote it (``connected`` false when none has run)."""
    from edge_agent.agent import AGENT_STATUS_FILE

    try:
        found: dict[str, Any] = json.loads((state / AGENT_STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {"connected": False, "error": "no agent has run here yet (edge-agent run)"}
    if found.get("connected") and not _alive(found.get("pid")):
        found.update(connected=False, error=f"the agent (pid {found.get('pid')}) is not running")
    return found


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def main() -> None:
    app()


if __name__ == "__main__":
    main()
