"""`cloud-hub usage|telemetry|status`: what the fleet and the hub are doing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cloud_hub.cli import (
    AsJson,
    HubUrl,
    StateDir,
    Token,
    app,
    client,
    run,
    show,
)


@app.command()
def usage(hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"),
          as_json: AsJson = False) -> None:  # fmt: skip
    """Cloud inference calls per device and model (cost tracking)."""
    rows = run(lambda: client(hub, token, state_dir).request("GET", "/v1/usage"))
    show(rows, ["device_id", "model", "calls"], as_json, "cloud usage")


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
    batches = run(lambda: client(hub, token, state_dir).request("GET", f"/v1/telemetry{query}"))
    rows = [
        {
            "device": b["device_id"],
            "seq": b["seq"],
            "model": w["model"],
            "version": w["version"],
            "route": w["route"],
            "calls": w["count"],
            "errors": w["errors"],
            "over budget": w.get("budget_breaches", 0),
            "mean ms": round(w["latency_ms_sum"] / max(w["count"], 1), 3),
        }
        for b in batches
        for w in b["windows"]
    ]
    show(
        rows,
        ["device", "seq", "model", "version", "route", "calls", "errors", "over budget", "mean ms"],
        as_json,
        "telemetry",
    )


@app.command()
def status(
    hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"), as_json: AsJson = False
) -> None:
    """The running hub's endpoints and counters."""
    data = run(lambda: client(hub, token, state_dir).request("GET", "/v1/status"))
    show([{"key": k, "value": v} for k, v in data.items()], ["key", "value"], as_json, "hub status")
