"""`cloud-hub rollback NAME --to VERSION --to-target TARGET`: a signed rollback (docs/security.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cloud_hub.cli import AsJson, HubUrl, StateDir, Token, app, client, fail, run, show
from cloud_hub.cli.deploy import _follow


@app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="Model name")],
    to: Annotated[str, typer.Option("--to", help="The version to go back to, e.g. 1.0.0")],
    to_target: Annotated[str, typer.Option("--to-target", help="device:ID, group:NAME or tag:KEY=VALUE")],
    wait: Annotated[float, typer.Option(help="Follow progress up to this many seconds (0: don't)")] = 0.0,
    hub: HubUrl = None,
    token: Token = None,
    state_dir: StateDir = Path("hub-state"),
    as_json: AsJson = False,
) -> None:
    """Roll a target back to an older model version. The hub signs each device's desired state with a
    counter that only grows, so devices accept this release below their installed one while a replayed
    old desired state, or an old artifact offered without it, is still refused. Recorded as a deployment
    (`deployments show ID`) and in the audit log."""
    if "@" in name:
        raise fail(f"{name!r}: give the model name alone and the version with --to, e.g. {name.split('@')[0]} "
                   f"--to {name.split('@')[1] or '1.0.0'}")  # fmt: skip
    admin = client(hub, token, state_dir)
    body = {"model": name, "version": to, "target": to_target}
    result = run(lambda: admin.request("POST", "/v1/rollbacks", json.dumps(body).encode()))
    rows = [{"deployment": result["deployment_id"], "device": d, "artifact": a} for d, a in result["devices"].items()]
    show(rows, ["deployment", "device", "artifact"], as_json, f"rolling {name} back to {to}")
    if wait > 0:
        _follow(admin, result["deployment_id"], wait)
