"""cloud-hub: run the hub (`serve`) and operate it (models, deploy, devices, telemetry, status).

Operator commands talk to the running hub's admin API; they never write its database directly.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cloud_hub.api_client import HUB_TOKEN_ENV, HUB_URL_ENV, AdminClient
from cloud_hub.errors import HubError
from cloud_hub.inference import InferenceOptions
from cloud_hub.server import TOKEN_FILE, HubConfig, serve

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
models_app = typer.Typer(help="Register and list model artifacts.", no_args_is_help=True)
devices_app = typer.Typer(help="List devices.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(devices_app, name="devices")
err = Console(stderr=True)
STATE_ENV = "EDGEFED_HUB_STATE_DIR"
HubUrl = Annotated[str | None, typer.Option("--hub", envvar=HUB_URL_ENV, help="Admin API URL")]
Token = Annotated[
    str | None,
    typer.Option("--token", envvar=HUB_TOKEN_ENV, help="Operator token (default: read from --state-dir)"),
]
StateDir = Annotated[Path, typer.Option("--state-dir", envvar=STATE_ENV, help="Hub state directory")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON for scripts")]


def _client(hub: str | None, token: str | None, state_dir: Path) -> AdminClient:
    if token is None and (state_dir / TOKEN_FILE).exists():
        token = (state_dir / TOKEN_FILE).read_text().strip()
    return AdminClient(hub, token)


def _run(call: Any) -> Any:
    try:
        return call()
    except HubError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def _show(rows: list[dict[str, Any]], columns: list[str], as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*(str(row.get(c, "")) for c in columns))
    Console().print(table)


@app.command("serve")
def serve_command(
    state_dir: StateDir = Path("hub-state"),
    broker: Annotated[
        str | None, typer.Option(help="External broker mqtt://host:port; default: embedded broker")
    ] = None,
    broker_host: Annotated[str, typer.Option(help="Embedded broker bind address")] = "127.0.0.1",
    broker_port: Annotated[int, typer.Option(help="Embedded broker port")] = 1883,
    grpc_host: Annotated[str, typer.Option(help="Inference (OIP gRPC) bind address")] = "127.0.0.1",
    grpc_port: Annotated[int, typer.Option(help="Inference (OIP gRPC) port; 0 picks a free one")] = 8001,
    admin_host: Annotated[str, typer.Option(help="Admin API bind address")] = "127.0.0.1",
    admin_port: Annotated[int, typer.Option(help="Admin API port; 0 picks a free one")] = 8080,
    trust: Annotated[list[Path] | None, typer.Option(help="Public key (.pub) to trust for uploads; repeatable")] = None,
    topic_root: Annotated[str, typer.Option(help="MQTT topic root")] = "edgefed/v1",
    max_batch_rows: Annotated[int, typer.Option(help="Dynamic batching: most rows per run (1 disables it)")] = 32,
    batch_delay_ms: Annotated[float, typer.Option(help="Dynamic batching: wait this long for more (0: none)")] = 0.0,
    queue_size: Annotated[int, typer.Option(help="Requests queued per model before RESOURCE_EXHAUSTED")] = 256,
    grpc_workers: Annotated[int, typer.Option(help="Inference calls served at once")] = 64,
    max_chunk_rate: Annotated[float, typer.Option(help="Artifact chunks published per second (0: no cap)")] = 0.0,
    require_token: Annotated[bool, typer.Option(help="Refuse inference calls without a device token")] = False,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate: serve gRPC over TLS")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key for --tls-cert")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Run the hub: registry, MQTT control plane, OIP gRPC inference and the admin API."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s hub %(levelname)s %(name)s: %(message)s")
    (state_dir / "trust").mkdir(parents=True, exist_ok=True)
    for key in trust or []:
        (state_dir / "trust" / key.name).write_bytes(key.read_bytes())
    if (tls_cert is None) != (tls_key is None):
        err.print("[red]error:[/red] --tls-cert and --tls-key go together")
        raise typer.Exit(2)
    inference = InferenceOptions(max_batch_rows=max_batch_rows, batch_delay_ms=batch_delay_ms, queue_size=queue_size,
                                 workers=grpc_workers,
                                 require_token=require_token, tls_cert=tls_cert, tls_key=tls_key)  # fmt: skip
    config = HubConfig(
        state_dir,
        broker,
        broker_host,
        broker_port,
        grpc_host,
        grpc_port,
        admin_host,
        admin_port,
        topic_root,
        inference,
        max_chunk_rate,
    )
    _run(lambda: serve(config))


@models_app.command("add")
def models_add(
    path: Annotated[list[Path], typer.Argument(help="Artifact directories from model-compiler")],
    hub: HubUrl = None,
    token: Token = None,
    state_dir: StateDir = Path("hub-state"),
    as_json: AsJson = False,
) -> None:
    """Upload signed artifacts to the hub (verified there before they are registered)."""
    client = _client(hub, token, state_dir)
    results = [_run(lambda p=p: client.add_artifact(p)) for p in path]
    _show(results, ["name", "version", "profile", "precision", "artifact_id", "new"], as_json, "artifacts added")


@models_app.command("list")
def models_list(
    hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"), as_json: AsJson = False
) -> None:
    """Registered artifacts, newest release first."""
    rows = _run(lambda: _client(hub, token, state_dir).request("GET", "/v1/models"))
    _show(rows, ["name", "version", "release", "profile", "precision", "size", "artifact_id"], as_json, "models")


@app.command()
def deploy(
    model: Annotated[str, typer.Argument(help="NAME@VERSION")],
    to: Annotated[str, typer.Option("--to", help="Target: device:ID")],
    hub: HubUrl = None,
    token: Token = None,
    state_dir: StateDir = Path("hub-state"),
    as_json: AsJson = False,
) -> None:
    """Deploy a model version: the hub publishes each targeted device's desired state."""
    name, sep, version = model.partition("@")
    if not sep or not name or not version:
        err.print(f"[red]error:[/red] {model!r}: write the model as NAME@VERSION, e.g. digits-cnn@1.0.0")
        raise typer.Exit(2)
    result = _run(lambda: _client(hub, token, state_dir).deploy(name, version, to))
    rows = [{"deployment": result["deployment_id"], "device": d, "artifact": a} for d, a in result["devices"].items()]
    _show(rows, ["deployment", "device", "artifact"], as_json, f"deployed {model}")


@devices_app.command("list")
def devices_list(
    hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"), as_json: AsJson = False
) -> None:
    """Devices the hub has heard from, with status and what they run."""
    rows = _run(lambda: _client(hub, token, state_dir).request("GET", "/v1/devices"))
    for row in rows:
        models = (row.get("reported") or {}).get("models", [])
        row["models"] = ", ".join(f"{m['name']}@{m.get('version')} {m['state']}" for m in models)
    _show(rows, ["device_id", "profile", "status", "models"], as_json, "devices")


@devices_app.command("token")
def devices_token(device: Annotated[str, typer.Argument(help="Device id")],
                  hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"),
                  as_json: AsJson = False) -> None:  # fmt: skip
    """Issue a bearer token for a device's cloud inference calls (shown once; put it in the agent's
    config with `edge-agent init --cloud-token`)."""
    result = _run(lambda: _client(hub, token, state_dir).request("POST", f"/v1/devices/{device}/token", b"{}"))
    if as_json:
        print(json.dumps(result))
    else:
        print(result["token"])


@app.command()
def usage(hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"),
          as_json: AsJson = False) -> None:  # fmt: skip
    """Cloud inference calls per device and model (cost tracking)."""
    rows = _run(lambda: _client(hub, token, state_dir).request("GET", "/v1/usage"))
    _show(rows, ["device_id", "model", "calls"], as_json, "cloud usage")


@app.command()
def telemetry(
    device: Annotated[str | None, typer.Option(help="Only this device")] = None,
    hub: HubUrl = None,
    token: Token = None,
    state_dir: StateDir = Path("hub-state"),
    as_json: AsJson = False,
) -> None:
    """Telemetry windows the hub has stored."""
    query = f"?device={device}" if device else ""
    batches = _run(lambda: _client(hub, token, state_dir).request("GET", f"/v1/telemetry{query}"))
    rows = [
        {
            "device": b["device_id"],
            "seq": b["seq"],
            "model": w["model"],
            "version": w["version"],
            "route": w["route"],
            "calls": w["count"],
            "errors": w["errors"],
            "mean ms": f"{w['latency_ms_sum'] / max(w['count'], 1):.3f}",
        }
        for b in batches
        for w in b["windows"]
    ]
    _show(
        rows,
        ["device", "seq", "model", "version", "route", "calls", "errors", "mean ms"],
        as_json,
        "telemetry",
    )


@app.command()
def status(
    hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"), as_json: AsJson = False
) -> None:
    """The running hub's endpoints and counters."""
    data = _run(lambda: _client(hub, token, state_dir).request("GET", "/v1/status"))
    _show([{"key": k, "value": v} for k, v in data.items()], ["key", "value"], as_json, "hub status")


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
