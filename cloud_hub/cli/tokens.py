"""`cloud-hub tokens create|list|revoke`: named admin tokens with a role (operator, deployer, viewer)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import typer

from cloud_hub.cli import AsJson, HubUrl, StateDir, Token, app, client, err, fail, run, show

tokens_app = typer.Typer(
    help="Named admin tokens: operator (everything), deployer (deploy, rollback, rollouts, A/B) or viewer "
    "(read-only). The hub keeps only each token's sha256.",
    no_args_is_help=True,
)
app.add_typer(tokens_app, name="tokens")
ROLES = ("operator", "deployer", "viewer")


def _when(value: object) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(value))) if isinstance(value, int | float) else ""


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Argument(help="The token's name, shown in the audit log (a-z, 0-9, . _ -)")],
    role: Annotated[str, typer.Option("--role", help="operator, deployer or viewer")],
    hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"), as_json: AsJson = False,
) -> None:  # fmt: skip
    """Create a token and print it once (the hub cannot show it again). Callers pass it with --token or
    EDGEFED_HUB_TOKEN."""
    if role not in ROLES:
        raise fail(f"--role {role!r}: use one of {', '.join(ROLES)}")
    body = json.dumps({"name": name, "role": role}).encode()
    result = run(lambda: client(hub, token, state_dir).request("POST", "/v1/tokens", body))
    if as_json:
        print(json.dumps(result))
        return
    err.print(f"token {name!r} ({role}); shown this once, store it now:")
    print(result["token"])


@tokens_app.command("list")
def tokens_list(
    hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"), as_json: AsJson = False
) -> None:
    """Named tokens: name, role, created, last used, revoked (never the tokens themselves)."""
    rows = run(lambda: client(hub, token, state_dir).request("GET", "/v1/tokens"))
    if not as_json:
        rows = [{**r, **{k: _when(r.get(k)) for k in ("created", "last_used", "revoked")}} for r in rows]
    show(rows, ["name", "role", "created", "last_used", "revoked"], as_json, "admin tokens")


@tokens_app.command("revoke")
def tokens_revoke(
    name: Annotated[str, typer.Argument(help="The token's name (see 'cloud-hub tokens list')")],
    hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"), as_json: AsJson = False,
) -> None:  # fmt: skip
    """Revoke a token: every call with it is refused (401) from now on. Its name is not reused."""
    result = run(lambda: client(hub, token, state_dir).request("POST", f"/v1/tokens/{quote(name, safe='')}/revoke",
                                                                b"{}"))  # fmt: skip
    print(json.dumps(result) if as_json else f"revoked {name}")
