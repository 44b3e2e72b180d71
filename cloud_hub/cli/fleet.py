"""`cloud-hub usage|telemetry|status`: what the fleet and the hub are doing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

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
    """Telemetry windows the hub has stored, with each batch's dropped calls (calls the device recorded but
    lost: a full queue or spool, a spool file deleted or corrupted) on its first row."""
    query = f"?device={device}" if device else ""
    batches = run(lambda: client(hub, token, state_dir).request("GET", f"/v1/telemetry{query}"))
    columns = ["device", "epoch", "seq", "model", "version", "route", "calls", "errors", "over budget", "mean ms"]
    show([row for b in batches for row in telemetry_rows(b)], [*columns, "dropped"], as_json, "telemetry")


def telemetry_rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per window of a stored batch (one row when it has none); the batch's ``dropped`` on the
    first, 0 on the others, so the column adds up."""
    head = {"device": batch["device_id"], "epoch": (batch.get("epoch") or "")[:8], "seq": batch["seq"]}
    rows = [
        {
            **head,
            "model": w["model"],
            "version": w["version"],
            "route": w["route"],
            "calls": w["count"],
            "errors": w["errors"],
            "over budget": w.get("budget_breaches", 0),
            "mean ms": round(w["latency_ms_sum"] / max(w["count"], 1), 3),
            "dropped": 0,
        }
        for w in batch["windows"]
    ] or [{**head, "calls": 0, "dropped": 0}]
    rows[0]["dropped"] = int(batch.get("dropped") or 0)
    return rows


@app.command()
def status(
    hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"), as_json: AsJson = False
) -> None:
    """The running hub's endpoints and counters."""
    data = run(lambda: client(hub, token, state_dir).request("GET", "/v1/status"))
    show([{"key": k, "value": v} for k, v in data.items()], ["key", "value"], as_json, "hub status")
