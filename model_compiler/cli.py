"""model-compiler: turn one source model into a signed, gated artifact per device profile."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from device_profiles import ProfileError
from edge_agent.protocol.manifest import valid_name
from edge_agent.protocol.signing import generate_keypair
from model_compiler.compile import CompileOptions, ProfileReport, compile_model
from model_compiler.errors import CompileError
from model_compiler.sources import load_data

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
console = Console(stderr=True, soft_wrap=True)  # a message is one line, however long
WIDE = 200  # table width when stdout is not a terminal (Rich would cut it to 80 columns)


@app.command()
def keygen(
    out: Annotated[Path, typer.Option(help="Directory for signing.key (0600) and signing.pub")] = Path("keys"),
) -> None:
    """Create an Ed25519 signing key pair. Give signing.pub to agents (`edge-agent init --trust`)."""
    key, pub = generate_keypair(out)
    console.print(f"wrote {key} (keep it secret) and {pub} (give it to agents)", markup=False)


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
    release: Annotated[
        int,
        typer.Option(
            help="Release number; 0 = the release of this version's artifacts already in --out, else "
            "the current Unix time"
        ),
    ] = 0,
    metric: Annotated[
        str, typer.Option(help="Gate metric: top1, cosine, max_abs, or file.py:fn (higher is better)")
    ] = "top1",
    tolerance: Annotated[
        float | None, typer.Option(help="Allowed loss (top1/cosine: 1 - value; max_abs: value)")
    ] = None,
    latency_batch: Annotated[int, typer.Option(help="Batch size used to time each variant")] = 1,
    max_batch: Annotated[int, typer.Option(help="Most rows one call may carry (the interface's); 0 = no limit")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON, and only that, on stdout")] = False,
) -> None:
    """Export, quantize, gate against fp32, time, and write a signed artifact for each profile.
    Exits 1 when a profile failed (the others are still written and reported), 2 when nothing could be."""
    problem = _check_identity(name, version, release)  # before any export: a bad flag fails at once
    if problem:
        console.print(f"[red]error:[/red] {escape(problem)}")
        raise typer.Exit(2)
    options = CompileOptions(name=name, version=version, key_path=key, release=release, metric=metric,
                             tolerance=tolerance, latency_batch=latency_batch, max_batch=max_batch)  # fmt: skip
    try:
        with stdout_to_stderr():  # converters print to stdout, from Python and from C
            data = load_data(calib, "calib"), load_data(val, "val")
            reports = run_with_progress(source, profile, *data, out, options, keep_failures=True)
    except (CompileError, ProfileError, ValueError, OSError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    for report in reports:
        for warning in report.warnings:
            console.print(f"[yellow]warning:[/yellow] {escape(f'{report.profile}: {warning}')}")
    if as_json:
        print(json.dumps([asdict(r) for r in reports], indent=2))
    else:
        print_table(reports)
    if any(r.error for r in reports):
        raise typer.Exit(1)


def _check_identity(name: str, version: str, release: int) -> str | None:
    """What is wrong with --name, --version or --release as a manifest would carry them, else None."""
    allowed = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 128 characters"
    for flag, value in (("--name", name), ("--version", version)):
        if not valid_name(value):
            return f"{flag} {value!r} is not allowed in a manifest: use {allowed} (e.g. --version 1.0.0)"
    if release < 0:
        return f"--release {release}: give a positive whole number, or 0 (this version's release in --out, else now)"
    return None


def print_table(reports: list[ProfileReport]) -> None:
    """Every attempt per profile, then one line per profile: its artifact, or why it has none."""
    out = Console(width=None if sys.stdout.isatty() else WIDE, soft_wrap=True)
    table = Table("profile", "runtime", "variant", "gate", "size", "latency ms", "chosen")
    for report in reports:
        for attempt in report.variants:
            table.add_row(*(Text(cell) for cell in _row(report, attempt)))
    out.print(table)
    for report in reports:
        line = f"{report.artifact} ({report.reason})" if not report.error else f"FAILED: {report.error}"
        out.print(f"{report.profile}: {line}", markup=False, highlight=False)


def _row(report: ProfileReport, attempt: dict[str, Any]) -> list[str]:
    gated = "metric" in attempt  # an attempt that could not be built has no gate, size or latency
    return [
        report.profile,
        attempt.get("runtime", ""),
        attempt["kind"],
        f"{attempt['metric']} {attempt['value']:.4f}" if gated else "-",
        f"{attempt['size'] / 1024:.0f} KiB" if gated else "-",
        f"{attempt['latency_ms']:.3f}" if gated else "-",
        "✓" if attempt["kind"] == report.chosen and not report.error else attempt["note"],
    ]


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send what is written to stdout meanwhile, by Python code (``sys.stdout``) or by C code (file
    descriptor 1), to stderr, so that stdout carries only the report."""
    sys.stdout.flush()
    _flush_c_stdio()
    saved, previous = os.dup(1), sys.stdout
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stderr.flush()
        _flush_c_stdio()  # what C code buffered belongs to stderr too
        sys.stdout = previous
        os.dup2(saved, 1)
        os.close(saved)


def _flush_c_stdio() -> None:
    with contextlib.suppress(Exception):  # no C library to flush: nothing buffered there
        ctypes.CDLL(None).fflush(None)


def run_with_progress(source: str, profiles: list[str], calib: Any, val: Any, out: Path, options: CompileOptions,
                      keep_failures: bool = False) -> list[ProfileReport]:  # fmt: skip
    """compile_model with a progress bar over the profiles and the current step as its label. A profile
    that failed raises CompileError naming each failure (after every profile was tried), unless
    ``keep_failures``: then it is a report with ``error`` set."""
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}", markup=False),
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

        reports = compile_model(source, profiles, calib, val, out, options, progress=update)
    failed = [f"{r.profile}: {r.error}" for r in reports if r.error]
    if failed and not keep_failures:
        raise CompileError(f"{len(failed)} of {len(reports)} profiles failed: {'; '.join(failed)}")
    return reports


def main() -> None:
    app()
