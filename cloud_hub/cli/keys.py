"""`cloud-hub keys list|add|revoke|rotate`: the signed key set devices trust (docs/security.md, "Rotating and
revoking keys"): which artifact-signing keys are trusted or revoked, and the hub key that signs it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer

from cloud_hub.cli import AsJson, HubUrl, StateDir, Token, app, client, err, fail, run, show
from edge_agent.protocol.signing import check_public_key_file

keys_app = typer.Typer(
    help="The signed key set: trusted and revoked artifact-signing keys (model-compiler keygen), and the hub key "
    "that signs it and every desired state.",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")


def _print(result: dict[str, Any], as_json: bool, text: str) -> None:
    print(json.dumps(result) if as_json else text)


@keys_app.command("list")
def keys_list(
    hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"), as_json: AsJson = False
) -> None:
    """The key set in force: its version, the hub key, and every trusted and revoked artifact-signing key."""
    found = run(lambda: client(hub, token, state_dir).request("GET", "/v1/keys"))
    if as_json:
        print(json.dumps(found, indent=2))
        return
    rows = [{"key_id": k["key_id"], "role": "hub key (signs key sets, desired states)", "state": "in force"}
            for k in found["hub_keys"]]  # fmt: skip
    rows += [{"key_id": k["key_id"], "role": "artifact signing", "state": "trusted"} for k in found["keys"]]
    rows += [{"key_id": k, "role": "", "state": "revoked"} for k in found["revoked"]]
    show(rows, ["key_id", "role", "state"], False, f"key set version {found['version']}")


@keys_app.command("add")
def keys_add(
    pub: Annotated[Path, typer.Argument(help="The signer's public key (signing.pub from model-compiler keygen)")],
    hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"), as_json: AsJson = False,
) -> None:  # fmt: skip
    """Trust one more artifact-signing key: a new key set version, published to every device."""
    try:
        check_public_key_file(pub)  # a private key, a missing file or garbage: said before anything is sent
    except ValueError as exc:
        raise fail(str(exc).replace("--trust ", "")) from None
    body = json.dumps({"public_key": pub.read_text()}).encode()
    result = run(lambda: client(hub, token, state_dir).request("POST", "/v1/keys", body))
    state = "trusted" if result["added"] else "was already trusted"
    _print(result, as_json, f"{result['key_id']} {state} (key set version {result['version']})")


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (see 'cloud-hub keys list')")],
    hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"), as_json: AsJson = False,
) -> None:  # fmt: skip
    """Revoke an artifact-signing key for good: devices and uploads refuse every artifact it signed."""
    path = f"/v1/keys/{quote(key_id, safe='')}/revoke"
    result = run(lambda: client(hub, token, state_dir).request("POST", path, b"{}"))
    _print(result, as_json, f"revoked {key_id} (key set version {result['version']})")


@keys_app.command("rotate")
def keys_rotate(
    hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"), as_json: AsJson = False
) -> None:
    """Replace the hub key: the new key set is signed by the old and the new key, so devices take it; the old
    key is retired. Enrollment tokens issued before pin the old key: issue new ones."""
    result = run(lambda: client(hub, token, state_dir).request("POST", "/v1/keys/rotate", b"{}"))
    if not as_json:
        err.print(f"retired hub key {result['retired_key_id']}; new enrollment tokens pin the new fingerprint")
    _print(result, as_json, f"hub key {result['key_id']} (key set version {result['version']})")
