"""`cloud-hub models add|list|show`: register artifacts and show versions and interfaces."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import DownloadColumn, Progress

from cloud_hub.api_client import AdminClient
from cloud_hub.cli import (
    AsJson,
    HubUrl,
    StateDir,
    Token,
    client,
    err,
    fail,
    models_app,
    run,
    show,
)
from cloud_hub.errors import HubError, NotFound


@models_app.command("add")
def models_add(
    path: Annotated[list[str], typer.Argument(help="Artifact directories; with --profile, model sources to compile")],
    profile: Annotated[list[str] | None, typer.Option("--profile", "-p", help="Compile for this profile first")] = None,
    calib: Annotated[Path | None, typer.Option(help="With --profile: calibration .npz")] = None,
    val: Annotated[Path | None, typer.Option(help="With --profile: validation .npz")] = None,
    name: Annotated[str | None, typer.Option(help="With --profile: model name")] = None,
    version: Annotated[str | None, typer.Option(help="With --profile: model version")] = None,
    key: Annotated[Path, typer.Option(help="With --profile: signing key")] = Path("keys/signing.key"),
    metric: Annotated[str, typer.Option(help="With --profile: gate metric (top1, cosine, max_abs)")] = "top1",
    allow_interface_change: Annotated[
        bool,
        typer.Option(
            help="Register a new version whose interface differs from the previous version's without a "
            "higher major version number (apps written for the old interface may break)"
        ),
    ] = False,
    hub: HubUrl = None,
    token: Token = None,
    state_dir: StateDir = Path("hub-state"),
    as_json: AsJson = False,
) -> None:
    """Upload signed artifacts to the hub (verified there before they are registered). With --profile,
    compile each source first, through the same Python API as `model-compiler compile`."""
    directories = [Path(p) for p in path]
    admin = client(hub, token, state_dir)
    if not profile:
        _upload(admin, directories, allow_interface_change, as_json)
        return
    release = _registered_release(admin, name, version)
    with tempfile.TemporaryDirectory(prefix="edgefed-compile-") as work:
        directories = _compile(path, profile, calib, val, name, version, key, metric, release, Path(work))
        _upload(admin, directories, allow_interface_change, as_json)


def _upload(admin: AdminClient, directories: list[Path], allow_interface_change: bool, as_json: bool) -> None:
    with Progress(*Progress.get_default_columns(), DownloadColumn(), console=err, transient=True) as progress:
        results = []
        for directory in directories:
            task = progress.add_task(f"upload {directory.name}", total=None)
            results.append(run(lambda d=directory, t=task: admin.add_artifact(
                d, lambda done, total: progress.update(t, completed=done, total=total),
                allow_interface_change)))  # fmt: skip
    show(results, ["name", "version", "release", "profile", "precision", "artifact_id", "new"], as_json,
         "artifacts added")  # fmt: skip


def _registered_release(admin: AdminClient, name: str | None, version: str | None) -> int:
    """The release the hub has for NAME@VERSION (its other profiles), 0 when none: a compile for another
    profile must reuse it."""
    if not name or not version:
        return 0
    try:
        return int(admin.request("GET", f"/v1/models/{name}/{version}")["release"])
    except NotFound:
        return 0
    except HubError as exc:
        raise fail(exc) from None


def _compile(sources: list[str], profiles: list[str], calib: Path | None, val: Path | None, name: str | None,
             version: str | None, key: Path, metric: str, release: int, out: Path) -> list[Path]:  # fmt: skip
    missing = [flag for flag, value in (("--calib", calib), ("--val", val), ("--name", name), ("--version", version))
               if value is None]  # fmt: skip
    if missing:
        raise fail(f"compiling with --profile also needs {', '.join(missing)}")
    from model_compiler.cli import run_with_progress
    from model_compiler.compile import CompileOptions
    from model_compiler.errors import CompileError
    from model_compiler.sources import load_npz

    assert calib is not None and val is not None and name is not None and version is not None
    options = CompileOptions(name=name, version=version, key_path=key, metric=metric, release=release)
    try:
        reports = []
        for source in sources:
            calib_data, val_data = load_npz(calib, "calib"), load_npz(val, "val")
            reports += run_with_progress(
                source, profiles, calib_data, val_data, out / Path(source).stem, options, keep_failures=True
            )
    except (CompileError, ValueError, OSError) as exc:
        raise fail(exc) from None
    for report in reports:
        if report.error:
            err.print(f"[yellow]not compiled for {report.profile}:[/yellow] {escape(report.error)}")
    return [Path(r.artifact) for r in reports if not r.error]


@models_app.command("list")
def models_list(
    hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"), as_json: AsJson = False
) -> None:
    """Registered artifacts, newest release first."""
    rows = run(lambda: client(hub, token, state_dir).request("GET", "/v1/models"))
    show(rows, ["name", "version", "release", "profile", "precision", "size", "artifact_id"], as_json, "models")


@models_app.command("show")
def models_show(model: Annotated[str, typer.Argument(help="NAME (its versions) or NAME@VERSION (its interface)")],
                hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"),
                as_json: AsJson = False) -> None:  # fmt: skip
    """A model's versions and artifacts, or one version's interface and its artifact per profile."""
    name, _, version = model.partition("@")
    admin = client(hub, token, state_dir)
    if not version:
        data = run(lambda: admin.request("GET", f"/v1/models/{name}"))
        show(data["artifacts"], ["version", "release", "profile", "precision", "size", "artifact_id"], as_json,
             f"{name}: versions {', '.join(data['versions'])}")  # fmt: skip
        return
    data = run(lambda: admin.request("GET", f"/v1/models/{name}/{version}"))
    if as_json:
        print(json.dumps(data, indent=2))
        return
    interface = data["interface"]
    tensors = [{"role": role[:-1], "name": t["name"], "dtype": t["dtype"], "shape": t["shape"]}
               for role in ("inputs", "outputs") for t in interface[role]]  # fmt: skip
    limit = interface["max_batch"] or "no limit"
    show(tensors, ["role", "name", "dtype", "shape"], False,
         f"{name}@{version}: release {data['release']}, max batch {limit}")  # fmt: skip
    for row in data["artifacts"]:
        row["cloud"] = "serves" if row["servable"] else "-"
        row["gate"] = f"{row['validation'].get('metric', '')} {row['validation'].get('value', '')}"
        row["latency ms"] = row["latency_ms"].get("median", "")
    show(data["artifacts"], ["profile", "runtime", "precision", "size", "gate", "latency ms", "cloud", "artifact_id"],
         False, f"artifacts (the hub serves profile {data['serving_profile']})")  # fmt: skip
