"""`cloud-hub examples list|export`: the hard examples devices uploaded (opt-in on the device) for
retraining."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

import typer

from cloud_hub.cli import AsJson, HubUrl, StateDir, Token, client, err, examples_app, fail, run, show
from edge_agent.protocol.atomic import atomic_write_bytes

Model = Annotated[str | None, typer.Option("--model", help="Only this model's examples")]
Device = Annotated[str | None, typer.Option("--device", help="Only this device's examples")]


def _query(model: str | None, device: str | None) -> str:
    params = {k: v for k, v in (("model", model), ("device", device)) if v}
    return f"/v1/examples?{urlencode(params)}" if params else "/v1/examples"


def _when(seconds: Any) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if seconds else ""


@examples_app.command("list")
def examples_list(model: Model = None, device: Device = None, hub: HubUrl = None, token: Token = None,
                  state_dir: StateDir = Path("hub-state"), as_json: AsJson = False) -> None:  # fmt: skip
    """Stored examples, newest first: id, model@version, device, why it was kept, when the device kept
    it, its size and arrays. Export them with `cloud-hub examples export --model M --out DIR`."""
    rows = run(lambda: client(hub, token, state_dir).request("GET", _query(model, device)))
    if not as_json:
        for row in rows:
            row["model"] = f"{row['model']}@{row['version']}"
            row["at"] = _when(row["at"])
            row["arrays"] = ", ".join(row["arrays"])
    show(rows, ["example_id", "model", "device_id", "reason", "at", "bytes", "arrays"], as_json, "hard examples")


@examples_app.command("export")
def examples_export(
    model: Annotated[str, typer.Option("--model", help="The model whose examples to export")],
    out: Annotated[Path, typer.Option("--out", help="Directory for ID.npz files and index.json")],
    device: Device = None, hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"),
    as_json: AsJson = False,
) -> None:  # fmt: skip
    """Write each stored example of --model as OUT/ID.npz (arrays `input/NAME`, `output/NAME`, as the
    app kept them) and OUT/index.json (one entry per example: id, file, model, version, device, reason,
    time, arrays). Files already in OUT with those names are replaced; others are left alone."""
    if out.exists() and not out.is_dir():
        raise fail(f"--out {out}: exists and is not a directory; name a directory")
    admin = client(hub, token, state_dir)
    rows = run(lambda: admin.request("GET", _query(model, device)))
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for row in rows:
        data = run(lambda row=row: admin.request("GET", f"/v1/examples/{quote(row['example_id'])}/npz", raw=True))
        name = f"{row['example_id']}.npz"
        atomic_write_bytes(out / name, data)
        index.append({**row, "file": name})
    atomic_write_bytes(out / "index.json", json.dumps(index, indent=2).encode())
    if as_json:
        print(json.dumps({"model": model, "out": str(out), "examples": len(index)}))
    else:
        err.print(f"exported {len(index)} hard examples of {model} to {out} (index.json lists them)")
