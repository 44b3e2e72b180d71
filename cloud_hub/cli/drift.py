"""`cloud-hub drift report|backtest`: where models drift, and how the detector would have done."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated
from urllib.parse import quote, urlencode

import typer

from cloud_hub.cli import AsJson, HubUrl, StateDir, Token, client, drift_app, fail, run, show


def _since(text: str | None) -> float:
    """``--since``: seconds ago with a unit (30m, 2h, 1d) or Unix seconds."""
    if text is None:
        return 0.0
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1:] in units:
            return time.time() - float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise fail(f"--since {text!r}: give an age such as 30m, 2h or 1d, or Unix seconds") from None


@drift_app.command("report")
def report(
    model: Annotated[str, typer.Argument(help="NAME or NAME@VERSION (default: the version scored last)")],
    group: Annotated[str | None, typer.Option(help="Only devices of this group (default: every device)")] = None,
    tag: Annotated[str | None, typer.Option(help="Only devices with this tag, KEY=VALUE")] = None,
    since: Annotated[str | None, typer.Option(help="Only windows since: 30m, 2h, 1d or Unix seconds")] = None,
    plot: Annotated[Path | None, typer.Option(help="Also draw FILE.png or FILE.html (histograms, scores)")] = None,
    operations: Annotated[bool, typer.Option(help="Errors, routes, budget, latency vs its first 2,000 calls")] = False,
    hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"), as_json: AsJson = False,
) -> None:  # fmt: skip
    """Features of a model version by drift score (latest window's CUSUM over the alarm threshold: 1 or
    more alarms), with PSI, Jensen-Shannon and the G-test p-value of the live counts since --since."""
    if plot is not None and plot.suffix.lower() not in (".png", ".html"):
        raise fail(f"--plot {plot}: name a .png or .html file")
    name, _, version = model.partition("@")
    if group and tag:
        raise fail("--group and --tag: give one of them")
    if tag is not None and "=" not in tag:
        raise fail(f"--tag {tag!r}: write it as KEY=VALUE")
    scope = f"group:{group}" if group else f"tag:{tag}" if tag else "all"
    query = {"scope": f"operations/{scope}" if operations else scope, "since": _since(since)}
    if version:
        query["version"] = version
    path = f"/v1/drift/{quote(name, safe='')}?{urlencode(query)}"
    found = run(lambda: client(hub, token, state_dir).request("GET", path))
    if plot is not None:
        from cloud_hub.drift.plot import write_plot

        write_plot(found, plot)
    if as_json:
        print(json.dumps(found))
        return
    if not found["windows"]:
        raise fail(f"no drift windows for {model} ({query['scope']}): the hub has not scored its telemetry yet", 1)
    rows = [{"feature": f["name"], "score": f"{f['score']:.3f}", "psi": f"{f.get('psi', 0):.4f}",
             "js": f"{f.get('js', 0):.4f}", "p": f"{f.get('p_value', 1):.2g}"}
            for f in found["features"][:20]]  # fmt: skip
    alarms = sum(w["alarm"] for w in found["windows"])
    title = f"{found['model']}@{found['version']} ({found['scope']}): {len(found['windows'])} windows, {alarms} alarms"
    show(rows, ["feature", "score", "psi", "js", "p"], False, title)


@drift_app.command("backtest")
def backtest(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory (with reference.json)")],
    data: Annotated[Path, typer.Argument(help=".npz of recorded inputs named as the model's inputs, in order")],
    window_calls: Annotated[int, typer.Option(min=1, help="Samples per window")] = 50,
    false_alarms: Annotated[float, typer.Option("--false-alarms-per-100k", min=1e-6,
                                                help="Target false alarms per 100,000 clean samples")] = 1.0,
    as_json: AsJson = False,
) -> None:  # fmt: skip
    """Feed recorded inputs through the model, the device's binning and the hub's detector, window by
    window; prints alarm_index (the sample at which the first alarm fires, or null), windows and per-window
    scores. Runs locally: no hub needed."""
    from cloud_hub.drift.backtest import BacktestError
    from cloud_hub.drift.backtest import backtest as run_backtest

    try:
        result = run_backtest(artifact, data, window_calls, false_alarms)
    except BacktestError as exc:
        raise fail(exc) from None
    if as_json:
        print(json.dumps(result))
        return
    first = result["alarm_index"]
    typer.echo(f"{result['model']}@{result['version']}: {result['samples']} samples in {result['windows']} windows "
               f"of {window_calls}; {len(result['alarms'])} alarms" + (f", first at sample {first} "
               f"({', '.join(result['drifting'][:5])})" if first is not None else ""))  # fmt: skip
