"""`cloud-hub alerts list|show|ack|resolve`."""

from __future__ import annotations

import getpass
import json
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from cloud_hub.cli import AsJson, HubUrl, StateDir, Token, alerts_app, client, err, run, show

AlertId = Annotated[str, typer.Argument(help="Alert id (the first column of `cloud-hub alerts list`)")]
By = Annotated[str | None, typer.Option("--by", help="Who acts, recorded on the alert (default: your user name)")]


class State(StrEnum):
    active = "active"
    open = "open"
    acknowledged = "acknowledged"
    resolved = "resolved"
    all = "all"


def _when(seconds: Any) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if seconds else ""


@alerts_app.command("list")
def alerts_list(
    state: Annotated[State, typer.Option(help="Which alerts: active = open or acknowledged")] = State.active,
    hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"), as_json: AsJson = False,
) -> None:  # fmt: skip
    """Alerts, most recently seen first: id, state, severity, kind, model@version, scope, how many times
    raised (count) and when last seen. Acknowledge with `alerts ack ID`, close with `alerts resolve ID`."""
    rows = run(lambda: client(hub, token, state_dir).request("GET", f"/v1/alerts?state={state.value}"))
    if not as_json:
        for row in rows:
            row["model"] = f"{row['model']}@{row['version']}"
            row["last_seen"] = _when(row["last_seen"])
    columns = ["id", "state", "severity", "kind", "model", "scope", "summary", "count", "last_seen"]
    show(rows, columns, as_json, f"alerts ({state.value})")


@alerts_app.command("show")
def alerts_show(alert_id: AlertId, hub: HubUrl = None, token: Token = None,
                state_dir: StateDir = Path("hub-state")) -> None:  # fmt: skip
    """Everything about one alert, its details included (JSON)."""
    print(json.dumps(run(lambda: client(hub, token, state_dir).request("GET", f"/v1/alerts/{alert_id}")), indent=2))


def _change(action: str, alert_id: str, by: str | None, hub: str | None, token: str | None, state_dir: Path,
            as_json: bool) -> None:  # fmt: skip
    body = json.dumps({"by": by or getpass.getuser()}).encode()
    alert = run(lambda: client(hub, token, state_dir).request("POST", f"/v1/alerts/{alert_id}/{action}", body))
    if as_json:
        print(json.dumps(alert))
    else:
        err.print(f"alert {alert['id']} {alert['state']}: {alert['summary']}")


@alerts_app.command("ack")
def alerts_ack(alert_id: AlertId, by: By = None, hub: HubUrl = None, token: Token = None,
               state_dir: StateDir = Path("hub-state"), as_json: AsJson = False) -> None:  # fmt: skip
    """Acknowledge an open alert: someone is on it. It stays unresolved, and raising it again only
    updates it (count, last seen, details) without a new webhook call."""
    _change("ack", alert_id, by, hub, token, state_dir, as_json)


@alerts_app.command("resolve")
def alerts_resolve(alert_id: AlertId, by: By = None, hub: HubUrl = None, token: Token = None,
                   state_dir: StateDir = Path("hub-state"), as_json: AsJson = False) -> None:  # fmt: skip
    """Resolve an open or acknowledged alert. If the condition comes back, a new alert opens."""
    _change("resolve", alert_id, by, hub, token, state_dir, as_json)
