"""`cloud-hub deploy` and `cloud-hub deployments list|show`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress

from cloud_hub.api_client import AdminClient
from cloud_hub.cli import (
    AsJson,
    HubUrl,
    StateDir,
    Token,
    app,
    client,
    deployments_app,
    err,
    fail,
    run,
    show,
)
from cloud_hub.cli.rollout import parse_gates, start_rollout


@app.command()
def deploy(
    model: Annotated[str, typer.Argument(help="NAME@VERSION")],
    to: Annotated[str, typer.Option("--to", help="Target: device:ID, group:NAME or tag:KEY=VALUE")],
    wait: Annotated[float, typer.Option(help="Follow progress up to this many seconds (0: don't)")] = 0.0,
    strategy: Annotated[
        str | None,
        typer.Option(
            help="all | canary | waves: a rollout with health gates "
            "(docs/rollouts.md); without it, every device at once"
        ),
    ] = None,
    canary: Annotated[str, typer.Option(help="Canary wave: 5% | N devices | device:ID,ID")] = "5%",
    waves: Annotated[str, typer.Option(help="Waves, cumulative: 5%,25%,100% (sizes as for --canary)")] = "5%,25%,100%",
    pause: Annotated[float, typer.Option(min=0.0, help="Seconds between a wave passing and the next")] = 0.0,
    gate: Annotated[
        list[str] | None,
        typer.Option(
            help="Health gate KEY=VALUE, repeatable: min_calls, min_soak_s, max_error_rate, "
            "max_error_ratio, max_p95_ratio, max_fallback_ratio, max_breach_ratio, max_drift_score"
        ),
    ] = None,
    on_failure: Annotated[str, typer.Option(help="rollback (to each device's previous version) or halt")] = "rollback",
    abort_failed: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Abort when more than this share of a wave's finished installs failed"),
    ] = 0.1,
    abort_min_devices: Annotated[int, typer.Option(min=1, help="... once this many devices finished")] = 5,
    hub: HubUrl = None,
    token: Token = None,
    state_dir: StateDir = Path("hub-state"),
    as_json: AsJson = False,
) -> None:
    """Deploy a model version: the hub publishes each targeted device's desired state; with --strategy, as
    a rollout in waves that must pass health gates, rolled back automatically when one fails."""
    name, sep, version = model.partition("@")
    if not sep or not name or not version:
        raise fail(f"{model!r}: write the model as NAME@VERSION, e.g. digits-cnn@1.0.0")
    admin = client(hub, token, state_dir)
    if strategy is not None:
        request = {"model": name, "version": version, "target": to, "strategy": strategy, "canary": canary,
                   "waves": waves.split(","), "pause_s": pause, "gates": parse_gates(gate or []),
                   "on_failure": on_failure, "abort": {"failed_fraction": abort_failed,
                                                       "min_devices": abort_min_devices}}  # fmt: skip
        return start_rollout(admin, request, wait, as_json)
    result = run(lambda: admin.deploy(name, version, to))
    rows = [{"deployment": result["deployment_id"], "device": d, "artifact": a} for d, a in result["devices"].items()]
    show(rows, ["deployment", "device", "artifact"], as_json, f"deployed {model}")
    if wait > 0:
        _follow(admin, result["deployment_id"], wait)


def _follow(client: AdminClient, deployment_id: str, timeout_s: float) -> None:
    """A progress bar over the deployment's devices until all are active or failed, or the timeout."""
    deadline = time.monotonic() + timeout_s
    with Progress(console=err) as progress:
        task = progress.add_task(f"deployment {deployment_id}", total=None)
        while True:
            states = run(lambda: client.request("GET", f"/v1/deployments/{deployment_id}"))["states"]
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
    rows = run(lambda: client(hub, token, state_dir).request("GET", "/v1/deployments"))
    for row in rows:
        row["devices"] = len(row["devices"])
    show(rows, ["deployment_id", "name", "version", "target", "devices"], as_json, "deployments")


@deployments_app.command("show")
def deployments_show(deployment_id: Annotated[str, typer.Argument(help="Deployment id")],
                     wait: Annotated[float, typer.Option(help="Follow progress up to this many seconds")] = 0.0,
                     hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"),
                     as_json: AsJson = False) -> None:  # fmt: skip
    """One deployment and each device's state (active, failed, pending)."""
    admin = client(hub, token, state_dir)
    if wait > 0:
        _follow(admin, deployment_id, wait)
    data = run(lambda: admin.request("GET", f"/v1/deployments/{deployment_id}"))
    rows = [{"device": d, **s} for d, s in data["states"].items()]
    show(rows, ["device", "state", "error"], as_json, f"{data['name']}@{data['version']} → {data['target']}")
