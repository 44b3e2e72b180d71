"""cloud-hub: run the hub (`serve`) and operate it (models, deploy, devices, telemetry, status).

Operator commands talk to the running hub's admin API; they never write its database directly.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import DownloadColumn, Progress
from rich.table import Table

from cloud_hub.api_client import HUB_TOKEN_ENV, HUB_URL_ENV, AdminClient
from cloud_hub.errors import HubError
from cloud_hub.inference import InferenceOptions
from cloud_hub.server import TOKEN_FILE, HubConfig, serve

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
models_app = typer.Typer(help="Register and list model artifacts.", no_args_is_help=True)
devices_app = typer.Typer(help="Enroll, list, show and remove devices.", no_args_is_help=True)
deployments_app = typer.Typer(help="List deployments and follow their progress.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(devices_app, name="devices")
app.add_typer(deployments_app, name="deployments")
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
    grpc_workers: Annotated[int, typer.Option(help="Inference calls served at once (per process)")] = 64,
    inference_processes: Annotated[
        int,
        typer.Option(
            min=1, help="Processes serving the gRPC port (one Python process uses about one core); try the CPU count"
        ),
    ] = 1,
    intra_op_threads: Annotated[
        int,
        typer.Option(
            min=0, help="ONNX Runtime threads per model session; 0: the CPUs divided among the inference processes"
        ),
    ] = 0,
    max_chunk_rate: Annotated[float, typer.Option(help="Artifact chunks published per second (0: no cap)")] = 0.0,
    shared_above: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Re-asked chunks more than this share of a round's requesting devices lack go on the artifact's "
            "shared topic, the others to each device that asked on its own topic (0: always shared); a first "
            "whole-artifact fetch is always served on the shared topic",
        ),
    ] = 0.5,
    public_broker: Annotated[
        str | None, typer.Option(help="Broker URL enrolled devices use (default: the hub's)")
    ] = None,
    public_grpc: Annotated[
        str | None, typer.Option(help="Inference URL enrolled devices use (default: grpc://host:port)")
    ] = None,
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
                                 workers=grpc_workers, processes=inference_processes,
                                 intra_op_threads=intra_op_threads,
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
        public_broker,
        public_grpc,
        shared_above,
    )
    _run(lambda: serve(config))


@models_app.command("add")
def models_add(
    path: Annotated[list[str], typer.Argument(help="Artifact directories; with --profile, model sources to compile")],
    profile: Annotated[list[str] | None, typer.Option("--profile", "-p", help="Compile for this profile first")] = None,
    calib: Annotated[Path | None, typer.Option(help="With --profile: calibration .npz")] = None,
    val: Annotated[Path | None, typer.Option(help="With --profile: validation .npz")] = None,
    name: Annotated[str | None, typer.Option(help="With --profile: model name")] = None,
    version: Annotated[str | None, typer.Option(help="With --profile: model version")] = None,
    key: Annotated[Path, typer.Option(help="With --profile: signing key")] = Path("keys/signing.key"),
    metric: Annotated[str, typer.Option(help="With --profile: gate metric (top1, cosine, max_abs)")] = "top1",
    hub: HubUrl = None,
    token: Token = None,
    state_dir: StateDir = Path("hub-state"),
    as_json: AsJson = False,
) -> None:
    """Upload signed artifacts to the hub (verified there before they are registered). With --profile,
    compile each source first, through the same Python API as `model-compiler compile`."""
    directories = [Path(p) for p in path]
    if profile:
        directories = _compile(path, profile, calib, val, name, version, key, metric)
    client = _client(hub, token, state_dir)
    with Progress(*Progress.get_default_columns(), DownloadColumn(), console=err, transient=True) as progress:
        results = []
        for directory in directories:
            task = progress.add_task(f"upload {directory.name}", total=None)
            results.append(_run(lambda d=directory, t=task: client.add_artifact(
                d, lambda done, total: progress.update(t, completed=done, total=total))))  # fmt: skip
    _show(results, ["name", "version", "profile", "precision", "artifact_id", "new"], as_json, "artifacts added")


def _compile(sources: list[str], profiles: list[str], calib: Path | None, val: Path | None, name: str | None,
             version: str | None, key: Path, metric: str) -> list[Path]:  # fmt: skip
    missing = [flag for flag, value in (("--calib", calib), ("--val", val), ("--name", name), ("--version", version))
               if value is None]  # fmt: skip
    if missing:
        err.print(f"[red]error:[/red] compiling with --profile also needs {', '.join(missing)}")
        raise typer.Exit(2)
    from model_compiler.cli import run_with_progress
    from model_compiler.compile import CompileOptions
    from model_compiler.errors import CompileError
    from model_compiler.sources import load_npz

    assert calib is not None and val is not None and name is not None and version is not None
    out = Path(tempfile.mkdtemp(prefix="edgefed-compile-"))
    options = CompileOptions(name=name, version=version, key_path=key, metric=metric)
    try:
        reports = []
        for source in sources:
            calib_data, val_data = load_npz(calib, "calib"), load_npz(val, "val")
            reports += run_with_progress(source, profiles, calib_data, val_data, out / Path(source).stem, options)
    except (CompileError, ValueError, OSError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    return [Path(r.artifact) for r in reports]


@models_app.command("list")
def models_list(
    hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"), as_json: AsJson = False
) -> None:
    """Registered artifacts, newest release first."""
    rows = _run(lambda: _client(hub, token, state_dir).request("GET", "/v1/models"))
    _show(rows, ["name", "version", "release", "profile", "precision", "size", "artifact_id"], as_json, "models")


@models_app.command("show")
def models_show(name: Annotated[str, typer.Argument(help="Model name")], hub: HubUrl = None, token: Token = None,
                state_dir: StateDir = Path("hub-state"), as_json: AsJson = False) -> None:  # fmt: skip
    """A model's versions and its artifact per profile."""
    data = _run(lambda: _client(hub, token, state_dir).request("GET", f"/v1/models/{name}"))
    _show(data["artifacts"], ["version", "release", "profile", "precision", "size", "artifact_id"], as_json,
          f"{name}: versions {', '.join(data['versions'])}")  # fmt: skip


@app.command()
def deploy(
    model: Annotated[str, typer.Argument(help="NAME@VERSION")],
    to: Annotated[str, typer.Option("--to", help="Target: device:ID, group:NAME or tag:KEY=VALUE")],
    wait: Annotated[float, typer.Option(help="Follow progress up to this many seconds (0: don't)")] = 0.0,
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
    client = _client(hub, token, state_dir)
    result = _run(lambda: client.deploy(name, version, to))
    rows = [{"deployment": result["deployment_id"], "device": d, "artifact": a} for d, a in result["devices"].items()]
    _show(rows, ["deployment", "device", "artifact"], as_json, f"deployed {model}")
    if wait > 0:
        _follow(client, result["deployment_id"], wait)


def _follow(client: AdminClient, deployment_id: str, timeout_s: float) -> None:
    """A progress bar over the deployment's devices until all are active or failed, or the timeout."""
    deadline = time.monotonic() + timeout_s
    with Progress(console=err) as progress:
        task = progress.add_task(f"deployment {deployment_id}", total=None)
        while True:
            states = _run(lambda: client.request("GET", f"/v1/deployments/{deployment_id}"))["states"]
            settled = sum(1 for s in states.values() if s["state"] in ("active", "failed"))
            progress.update(task, total=len(states), completed=settled)
            if settled == len(states) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    failed = {d: s.get("error") for d, s in states.items() if s["state"] == "failed"}
    for device, error in failed.items():
        err.print(f"[red]{device} failed:[/red] {error}")
    if failed or settled < len(states):
        raise typer.Exit(1)


@deployments_app.command("list")
def deployments_list(hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"),
                     as_json: AsJson = False) -> None:  # fmt: skip
    """Deployments, newest first."""
    rows = _run(lambda: _client(hub, token, state_dir).request("GET", "/v1/deployments"))
    for row in rows:
        row["devices"] = len(row["devices"])
    _show(rows, ["deployment_id", "name", "version", "target", "devices"], as_json, "deployments")


@deployments_app.command("show")
def deployments_show(deployment_id: Annotated[str, typer.Argument(help="Deployment id")],
                     wait: Annotated[float, typer.Option(help="Follow progress up to this many seconds")] = 0.0,
                     hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"),
                     as_json: AsJson = False) -> None:  # fmt: skip
    """One deployment and each device's state (active, failed, pending)."""
    client = _client(hub, token, state_dir)
    if wait > 0:
        _follow(client, deployment_id, wait)
    data = _run(lambda: client.request("GET", f"/v1/deployments/{deployment_id}"))
    rows = [{"device": d, **s} for d, s in data["states"].items()]
    _show(rows, ["device", "state", "error"], as_json, f"{data['name']}@{data['version']} → {data['target']}")


@devices_app.command("list")
def devices_list(
    hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"), as_json: AsJson = False
) -> None:
    """Devices the hub has heard from, with status and what they run."""
    rows = _run(lambda: _client(hub, token, state_dir).request("GET", "/v1/devices"))
    for row in rows:
        models = (row.get("reported") or {}).get("models", [])
        row["models"] = ", ".join(f"{m['name']}@{m.get('version')} {m['state']}" for m in models)
    for row in rows:
        row["groups"] = ", ".join(row.get("groups") or [])
    _show(rows, ["device_id", "profile", "status", "groups", "models"], as_json, "devices")


@devices_app.command("enroll-token")
def devices_enroll_token(
    group: Annotated[list[str] | None, typer.Option(help="Group the device joins; repeatable")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="KEY=VALUE tag for the device; repeatable")] = None,
    ttl: Annotated[float, typer.Option(help="Seconds the token stays valid")] = 3600.0,
    hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"), as_json: AsJson = False,
) -> None:  # fmt: skip
    """A single-use, expiring token for `edge-agent enroll --hub URL --token TOKEN`."""
    tags = {}
    for item in tag or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            err.print(f"[red]error:[/red] --tag {item!r}: write it as KEY=VALUE")
            raise typer.Exit(2)
        tags[key] = value
    body = json.dumps({"groups": group or [], "tags": tags, "ttl_s": ttl}).encode()
    result = _run(lambda: _client(hub, token, state_dir).request("POST", "/v1/enroll-tokens", body))
    print(json.dumps(result) if as_json else result["token"])


@devices_app.command("show")
def devices_show(device: Annotated[str, typer.Argument(help="Device id")], hub: HubUrl = None, token: Token = None,
                 state_dir: StateDir = Path("hub-state")) -> None:  # fmt: skip
    """Everything the hub knows about one device (JSON)."""
    print(json.dumps(_run(lambda: _client(hub, token, state_dir).request("GET", f"/v1/devices/{device}")),
                     indent=2, default=str))  # fmt: skip


@devices_app.command("remove")
def devices_remove(device: Annotated[str, typer.Argument(help="Device id")], hub: HubUrl = None, token: Token = None,
                   state_dir: StateDir = Path("hub-state")) -> None:  # fmt: skip
    """Forget a device: its record, desired models and tokens; its retained messages are cleared and what it
    still publishes is ignored until it enrolls again."""
    _run(lambda: _client(hub, token, state_dir).request("DELETE", f"/v1/devices/{device}"))
    err.print(f"removed {device}")


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
