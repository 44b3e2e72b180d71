"""`cloud-hub rollout list|status|pause|resume|abort|rollback` and the rollout side of `deploy --strategy`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from cloud_hub.api_client import AdminClient
from cloud_hub.cli import AsJson, HubUrl, StateDir, Token, client, err, fail, rollout_app, run, show

FINAL = ("succeeded", "failed", "rolled-back", "aborted")
RolloutId = Annotated[str, typer.Argument(help="Rollout id (see 'cloud-hub rollout list')")]


def parse_gates(items: list[str]) -> dict[str, float]:
    gates = {}
    for item in items:
        key, eq, value = item.partition("=")
        try:
            gates[key] = float(value) if eq and key else float("nan")
        except ValueError:
            gates[key] = float("nan")
        if gates[key] != gates[key]:
            raise fail(f"--gate {item!r}: write it as KEY=NUMBER, e.g. --gate max_p95_ratio=1.5")
    return gates


def start_rollout(admin: AdminClient, request: dict[str, Any], wait: float, as_json: bool) -> None:
    rollout = run(lambda: admin.request("POST", "/v1/rollouts", json.dumps(request).encode()))
    if as_json and wait <= 0:
        print(json.dumps(rollout))
        return
    sizes = ", ".join(str(len(w["devices"])) for w in rollout["waves"])
    err.print(f"rollout {rollout['id']}: {request['model']}@{request['version']} → {request['target']} in "
              f"{len(rollout['waves'])} waves ({sizes} devices)")  # fmt: skip
    if wait > 0:
        final = follow(admin, rollout["id"], wait)
        if as_json:
            print(json.dumps(final))
        if final["state"] != "succeeded":
            raise typer.Exit(1)


def _line(rollout: dict[str, Any]) -> str:
    wave = rollout["waves"][rollout["current_wave"]]
    verdict = wave.get("verdict", {}).get("why", "")
    where = f"wave {rollout['current_wave'] + 1}/{len(rollout['waves'])}"
    reached = f"{rollout['deployed']}/{rollout['devices']} devices reached"
    return f"{rollout['state']}: {where}, {reached}" + (f"; {verdict}" if verdict else "")


def follow(admin: AdminClient, rollout_id: str, timeout_s: float) -> dict[str, Any]:
    """Print each change of the rollout's progress until it ends or ``timeout_s`` passes."""
    deadline, last = time.monotonic() + timeout_s, ""
    while True:
        rollout: dict[str, Any] = run(lambda: admin.request("GET", f"/v1/rollouts/{rollout_id}"))
        line = _line(rollout)
        if line != last:
            err.print(f"{time.strftime('%H:%M:%S')} {line}")
            last = line
        if rollout["state"] in FINAL or time.monotonic() > deadline:
            if rollout["reason"]:
                err.print(f"reason: {rollout['reason']}")
            return rollout
        time.sleep(0.5)


@rollout_app.command("list")
def rollout_list(hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"),
                 as_json: AsJson = False) -> None:  # fmt: skip
    """Rollouts, newest first."""
    rows = run(lambda: client(hub, token, state_dir).request("GET", "/v1/rollouts"))
    for row in rows:
        row["model"] = f"{row['model']}@{row['version']}"
        row["wave"] = f"{row['current_wave'] + 1}/{len(row['waves'])}"
        row["reached"] = f"{row['deployed']}/{row['devices']}"
    show(rows, ["id", "model", "target", "strategy", "state", "wave", "reached", "reason"], as_json, "rollouts")


@rollout_app.command("status")
def rollout_status(
    rollout_id: RolloutId,
    watch: Annotated[float, typer.Option(help="Follow its progress up to this many seconds")] = 0.0,
    hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"), as_json: AsJson = False,
) -> None:  # fmt: skip
    """One rollout: its waves (devices, deployment, gate verdict) and its latest events."""
    admin = client(hub, token, state_dir)
    rollout = (
        follow(admin, rollout_id, watch)
        if watch > 0
        else run(lambda: admin.request("GET", f"/v1/rollouts/{rollout_id}"))
    )
    if as_json:
        print(json.dumps(rollout))
        return
    rows = [{"wave": i + 1, "devices": len(w["devices"]), "deployment": w["deployment_id"] or "",
             "verdict": (w.get("verdict") or {}).get("why", "")} for i, w in enumerate(rollout["waves"])]  # fmt: skip
    show(
        rows,
        ["wave", "devices", "deployment", "verdict"],
        False,
        f"rollout {rollout['id']}: {rollout['model']}@{rollout['version']} → {rollout['target']} ({_line(rollout)})",
    )
    for event in rollout["events"][-10:]:
        err.print(f"{time.strftime('%H:%M:%S', time.localtime(event['at']))} {event['event']}")


def _action(action: str, rollout_id: str, hub: str | None, token: str | None, state_dir: Path, as_json: bool) -> None:
    admin = client(hub, token, state_dir)
    rollout = run(lambda: admin.request("POST", f"/v1/rollouts/{rollout_id}/{action}", b"{}"))
    print(json.dumps(rollout)) if as_json else err.print(f"rollout {rollout_id}: {_line(rollout)}")


ACTIONS = {
    "pause": "Hold a running rollout where it is (the wave under way keeps what it has).",
    "resume": "Go on with a paused rollout.",
    "abort": "Stop a rollout: no further wave; devices keep what they run (roll back with 'rollout rollback').",
    "rollback": "Send every device the rollout reached back to the version it ran before (a signed rollback).",
}


def _register(action: str, help_text: str) -> None:
    def command(rollout_id: RolloutId, hub: HubUrl = None, token: Token = None,
                state_dir: StateDir = Path("hub-state"), as_json: AsJson = False) -> None:  # fmt: skip
        _action(action, rollout_id, hub, token, state_dir, as_json)

    command.__doc__ = help_text
    rollout_app.command(action)(command)


for _name, _help in ACTIONS.items():
    _register(_name, _help)
