"""`cloud-hub devices list|enroll-token|show|remove|token`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cloud_hub.cli import (
    AsJson,
    HubUrl,
    StateDir,
    Token,
    client,
    devices_app,
    err,
    fail,
    run,
    show,
)


@devices_app.command("list")
def devices_list(
    hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"), as_json: AsJson = False
) -> None:
    """Devices the hub has heard from, with status and what they run."""
    rows = run(lambda: client(hub, token, state_dir).request("GET", "/v1/devices"))
    for row in rows:
        models = (row.get("reported") or {}).get("models", [])
        row["models"] = ", ".join(f"{m['name']}@{m.get('version')} {m['state']}" for m in models)
        if (row.get("reported") or {}).get("error"):
            row["models"] += f" (error: {row['reported']['error']})"
    for row in rows:
        row["groups"] = ", ".join(row.get("groups") or [])
    show(rows, ["device_id", "profile", "status", "groups", "models"], as_json, "devices")


@devices_app.command("enroll-token")
def devices_enroll_token(
    group: Annotated[list[str] | None, typer.Option(help="Group the device joins; repeatable")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="KEY=VALUE tag for the device; repeatable")] = None,
    ttl: Annotated[float, typer.Option(help="Seconds the token stays valid")] = 3600.0,
    reenroll: Annotated[str | None, typer.Option(help="Existing device id this token may enroll again")] = None,
    hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"), as_json: AsJson = False,
) -> None:  # fmt: skip
    """A single-use, expiring token for `edge-agent enroll --hub URL --token TOKEN`: SECRET.FINGERPRINT, the
    fingerprint pinning the hub key the device must find in the signed answer. It enrolls only a new
    device id, unless --reenroll names the existing one it may enroll again."""
    tags = {}
    for item in tag or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise fail(f"--tag {item!r}: write it as KEY=VALUE")
        tags[key] = value
    request = {"groups": group or [], "tags": tags, "ttl_s": ttl, **({"reenroll": reenroll} if reenroll else {})}
    body = json.dumps(request).encode()
    result = run(lambda: client(hub, token, state_dir).request("POST", "/v1/enroll-tokens", body))
    print(json.dumps(result) if as_json else result["token"])


@devices_app.command("show")
def devices_show(device: Annotated[str, typer.Argument(help="Device id")], hub: HubUrl = None, token: Token = None,
                 state_dir: StateDir = Path("hub-state")) -> None:  # fmt: skip
    """Everything the hub knows about one device (JSON)."""
    print(json.dumps(run(lambda: client(hub, token, state_dir).request("GET", f"/v1/devices/{device}")),
                     indent=2, default=str))  # fmt: skip


@devices_app.command("remove")
def devices_remove(device: Annotated[str, typer.Argument(help="Device id")], hub: HubUrl = None, token: Token = None,
                   state_dir: StateDir = Path("hub-state")) -> None:  # fmt: skip
    """Forget a device: its record, desired models and tokens; its retained messages are cleared and what it
    still publishes is ignored until it enrolls again."""
    run(lambda: client(hub, token, state_dir).request("DELETE", f"/v1/devices/{device}"))
    err.print(f"removed {device}")


@devices_app.command("token")
def devices_token(device: Annotated[str, typer.Argument(help="Device id")],
                  hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"),
                  as_json: AsJson = False) -> None:  # fmt: skip
    """Issue a bearer token for a device's cloud inference calls (shown once; put it in the agent's
    config with `edge-agent init --cloud-token`)."""
    result = run(lambda: client(hub, token, state_dir).request("POST", f"/v1/devices/{device}/token", b"{}"))
    if as_json:
        print(json.dumps(result))
    else:
        print(result["token"])
