"""model-compiler: turn one source model into a signed, gated artifact per device profile."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from device_profiles import ProfileError
from edge_agent.protocol.signing import generate_keypair
from model_compiler.compile import CompileOptions, ProfileReport, compile_model
from model_compiler.errors import CompileError
from model_compiler.sources import load_data

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
console = Console(stderr=True)


@app.command()
def keygen(
    out: Annotated[Path, typer.Option(help="Directory for signing.key (0600) and signing.pub")] = Path("keys"),
) -> None:
    """Create an Ed25519 signing key pair. Give signing.pub to agents (`edge-agent init --trust`)."""
    key, pub = generate_keypair(out)
    console.print(f"wrote {key} (keep it secret) and {pub} (give it to agents)")


@app.command("compile")
def compile_command(
    source: Annotated[str, typer.Argument(help="path/to/file.py:factory, module:factory, a .pt2 program or .onnx")],
    profile: Annotated[list[str], typer.Option("--profile", "-p", help="Target profile id; repeat for several")],
    calib: Annotated[str, typer.Option(help=".npz ('x', or one array per input) or file.py:fn yielding batches")],
    val: Annotated[str, typer.Option(help="Validation data, like --calib (an .npz may add labels 'y')")],
    out: Annotated[Path, typer.Option(help="Output directory; one artifact directory per profile")],
    name: Annotated[str, typer.Option(help="Model name")],
    version: Annotated[str, typer.Option(help="Semantic version, e.g. 1.0.0")],
    key: Annotated[Path, typer.Option(help="Ed25519 private key from `model-compiler keygen`")] = Path(
        "keys/signing.key"
    ),
    release: Annotated[int, typer.Option(help="Release number; 0 = current Unix time (always increasing)")] = 0,
    metric: Annotated[
        str, typer.Option(help="Gate metric: top1, cosine, max_abs, or file.py:fn (higher is better)")
    ] = "top1",
    tolerance: Annotated[
        float | None, typer.Option(help="Allowed loss (top1/cosine: 1 - value; max_abs: value)")
    ] = None,
    latency_batch: Annotated[int, typer.Option(help="Batch size used to time each variant")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout")] = False,
) -> None:
    """Export, quantize, gate against fp32, time, and write a signed artifact for each profile."""
    options = CompileOptions(
        name=name,
        version=version,
        key_path=key,
        release=release,
        metric=metric,
        tolerance=tolerance,
        latency_batch=latency_batch,
    )
    try:
        reports = run_with_progress(source, profile, load_data(calib, "calib"), load_data(val, "val"), out, options)
    except (CompileError, ProfileError, ValueError, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps([asdict(r) for r in reports], indent=2))
        return
    table = Table("profile", "variant", "gate", "size", "latency ms", "chosen")
    for report in reports:
        for attempt in report.variants:
            table.add_row(
                report.profile,
                attempt["kind"],
                f"{attempt['metric']} {attempt['value']:.4f}",
                f"{attempt['size'] / 1024:.0f} KiB",
                f"{attempt['latency_ms']:.3f}",
                "✓" if attempt["kind"] == report.chosen else attempt["note"],
            )
    Console().print(table)
    for report in reports:
        Console().print(f"{report.profile}: {report.artifact} ({report.reason})")


def run_with_progress(source: str, profiles: list[str], calib: Any, val: Any, out: Path,
                      options: CompileOptions) -> list[ProfileReport]:  # fmt: skip
    """compile_model with a progress bar over the profiles and the current step as its label."""
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("exporting", total=len(profiles))

        def update(message: str) -> None:
            progress.update(task, description=message[:70])
            if any(message.startswith(f"{p}: ") for p in profiles):
                progress.advance(task)

        return compile_model(source, profiles, calib, val, out, options, progress=update)


def main() -> None:
    app()
