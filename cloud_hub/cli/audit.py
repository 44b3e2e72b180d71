"""`cloud-hub audit [--since 1h|UNIX] [--json]`: the append-only log of changes made through the admin API."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from cloud_hub.cli import AsJson, HubUrl, StateDir, Token, app, client, run, show
from cloud_hub.cli.drift import _since


def _row(entry: dict[str, Any]) -> dict[str, Any]:
    detail = entry.get("detail") or {}
    outcome = detail.get("outcome", "")
    if outcome == "error":
        outcome = f"{detail.get('status')} {detail.get('error') or ''}".strip()
    targets = detail.get("targets") or {k: v for k, v in detail.items() if k not in ("path", "status", "outcome")}
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["ts"]))
    return {"when": when, "who": entry["actor"], "what": entry["action"],
            "targets": json.dumps(targets, sort_keys=True), "outcome": outcome or "ok"}  # fmt: skip


@app.command()
def audit(
    since: Annotated[str | None, typer.Option(help="Only entries since: 30m, 2h, 1d or Unix seconds")] = None,
    hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"), as_json: AsJson = False,
) -> None:  # fmt: skip
    """Every change made through the admin API, refused ones too, oldest first: when, who (the token's
    name), what (method and route, and the hub's own entries such as deploy), its targets and the outcome."""
    entries = run(lambda: client(hub, token, state_dir).request("GET", f"/v1/audit?since={_since(since)}"))
    if as_json:
        print(json.dumps(entries, indent=2, default=str))
        return
    show([_row(e) for e in entries], ["when", "who", "what", "targets", "outcome"], False, "audit log")
