"""cloud-hub: run the hub (`serve`) and operate it (models, deploy, devices, alerts, drift, telemetry, status).

Operator commands talk to the running hub's admin API; they never write its database directly. One
module per command group: ``serve``, ``models``, ``deploy`` (deploy and deployments), ``devices`` and
``fleet`` (usage, telemetry, status), ``alerts``, ``drift``, ``examples``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cloud_hub.api_client import HUB_TOKEN_ENV, HUB_URL_ENV, AdminClient
from cloud_hub.errors import HubError
from cloud_hub.hub_config import TOKEN_FILE
from device_profiles import ProfileError

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
models_app = typer.Typer(help="Register, list and show models and their interfaces.", no_args_is_help=True)
devices_app = typer.Typer(help="Enroll, list, show and remove devices.", no_args_is_help=True)
deployments_app = typer.Typer(help="List deployments and follow their progress.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(devices_app, name="devices")
alerts_app = typer.Typer(help="List, acknowledge and resolve alerts (drift and others).", no_args_is_help=True)
app.add_typer(deployments_app, name="deployments")
app.add_typer(alerts_app, name="alerts")
rollout_app = typer.Typer(help="Follow and steer rollouts: waves with health gates.", no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")
ab_app = typer.Typer(help="A/B tests: two versions of a model split on the devices, compared.", no_args_is_help=True)
app.add_typer(ab_app, name="ab")
drift_app = typer.Typer(help="Drift reports and backtests of the drift detector.", no_args_is_help=True)
app.add_typer(drift_app, name="drift")
examples_app = typer.Typer(help="List and export the hard examples devices uploaded (opt-in).", no_args_is_help=True)
app.add_typer(examples_app, name="examples")
err = Console(stderr=True, soft_wrap=True)  # messages are never cut or wrapped mid-word
STATE_ENV = "EDGEFED_HUB_STATE_DIR"
HubUrl = Annotated[str | None, typer.Option("--hub", envvar=HUB_URL_ENV, help="Admin API URL")]
Token = Annotated[
    str | None,
    typer.Option("--token", envvar=HUB_TOKEN_ENV, help="Admin token (default: operator.token in --state-dir)"),
]
StateDir = Annotated[Path, typer.Option("--state-dir", envvar=STATE_ENV, help="Hub state directory")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON for scripts")]


def out() -> Console:
    """Standard output; as wide as the table needs when it is not a terminal (a pipe, a file)."""
    return Console() if sys.stdout.isatty() else Console(width=1000)


def fail(message: object, code: int = 2) -> typer.Exit:
    """Print ``error: message`` (never read as Rich markup) and return the exit to raise."""
    err.print(f"[red]error:[/red] {escape(str(message))}")
    return typer.Exit(code)


def client(hub: str | None, token: str | None, state_dir: Path) -> AdminClient:
    if token is None:
        path = state_dir / TOKEN_FILE
        if not path.exists():
            raise fail(f"no operator token: {path} does not exist; pass the running hub's --state-dir, or --token "
                       f"(or {HUB_TOKEN_ENV})")  # fmt: skip
        token = path.read_text().strip()
    return AdminClient(hub, token)


def run(call: Any) -> Any:
    try:
        return call()
    except (HubError, ProfileError) as exc:
        raise fail(exc) from None


def show(rows: list[dict[str, Any]], columns: list[str], as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*(escape(str(row.get(c, ""))) for c in columns))
    out().print(table)


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


from cloud_hub.cli import (  # noqa: E402  (they register their commands)
    ab,
    alerts,
    audit,
    deploy,
    devices,
    drift,
    examples,
    fleet,
    keys,
    models,
    mqtt,
    rollback,
    rollout,
    serve,
    tls,
    tokens,
    triton,
)

__all__ = [
    "ab",
    "alerts",
    "app",
    "audit",
    "deploy",
    "devices",
    "drift",
    "examples",
    "fleet",
    "keys",
    "main",
    "models",
    "mqtt",
    "rollback",
    "rollout",
    "serve",
    "tls",
    "tokens",
    "triton",
]
