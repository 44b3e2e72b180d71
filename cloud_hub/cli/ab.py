"""`cloud-hub ab start|list|status|promote|stop`: A/B tests of two versions of a model (docs/ab.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from cloud_hub.cli import AsJson, HubUrl, StateDir, Token, ab_app, client, fail, out, run, show

TestId = Annotated[str, typer.Argument(help="A/B test id (see 'cloud-hub ab list')")]


@ab_app.command("start")
def start(
    name: Annotated[str, typer.Argument(help="Model name")],
    a: Annotated[str, typer.Option("--a", help="Version A (the control), e.g. 1.1.0")],
    b: Annotated[str, typer.Option("--b", help="Version B (the candidate), e.g. 1.2.0")],
    to: Annotated[str, typer.Option("--to", help="device:ID, group:NAME or tag:KEY=VALUE")],
    split: Annotated[float, typer.Option(help="Percent of calls for B (sticky per request key)")] = 50.0,
    hub: HubUrl = None,
    token: Token = None,
    state_dir: StateDir = Path("hub-state"),
    as_json: AsJson = False,
) -> None:
    """Put B beside A on the target's devices; each device's SDK sends SPLIT percent of calls to B (the
    same version for the same request key). Refused when A and B differ in interface."""
    if "@" in name:
        raise fail(f"{name!r}: give the model name alone, the versions with --a and --b")
    admin = client(hub, token, state_dir)
    body = {"model": name, "a": a, "b": b, "split": split, "target": to}
    test = run(lambda: admin.request("POST", "/v1/ab", json.dumps(body).encode()))
    if as_json:
        print(json.dumps(test, indent=2))
        return
    out().print(f"A/B test {test['id']}: {name} {a} (A) vs {b} (B), {split:g}% of calls to B on "
                f"{len(test['devices'])} devices; follow it with 'cloud-hub ab status {test['id']}'")  # fmt: skip


@ab_app.command("list")
def list_tests(hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"),
               as_json: AsJson = False) -> None:  # fmt: skip
    """A/B tests, newest first."""
    admin = client(hub, token, state_dir)
    tests = run(lambda: admin.request("GET", "/v1/ab"))
    rows = [{**t, "devices": len(t["devices"]), "split": f"{t['split']:g}%"} for t in tests]
    show(rows if not as_json else tests, ["id", "model", "a", "b", "split", "target", "devices", "state"], as_json,
         "A/B tests")  # fmt: skip


def _pct(figure: dict[str, Any]) -> str:
    if figure["value"] is None:
        return "-"
    low, high = figure["ci95"]
    return f"{figure['value'] * 100:.2f}% [{low * 100:.2f}, {high * 100:.2f}]"


def _ms(figure: dict[str, Any]) -> str:
    if figure["value"] is None:
        return "-"
    low, high = figure["ci95"]
    return f"{figure['value']:.3f} [{low:.3f}, {high:.3f}]"


@ab_app.command("status")
def status(test_id: TestId, hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"),
           as_json: AsJson = False) -> None:  # fmt: skip
    """Both versions' calls, error rate, fallback rate, p50/p95 latency and output distribution with 95%
    confidence intervals, the split observed, and a verdict."""
    admin = client(hub, token, state_dir)
    test = run(lambda: admin.request("GET", f"/v1/ab/{test_id}"))
    if as_json:
        print(json.dumps(test, indent=2))
        return
    observed = test["observed_split"]
    table = Table("", f"A {escape(test['a'])}", f"B {escape(test['b'])}",
                  title=f"A/B test {test['id']} of {escape(test['model'])} ({test['state']})")  # fmt: skip
    figures = test["figures"]
    table.add_row("calls", str(figures["a"]["calls"]), str(figures["b"]["calls"]))
    for key, label in (("error_rate", "error rate"), ("fallback_rate", "fallback rate")):
        table.add_row(f"{label} (95% CI)", _pct(figures["a"][key]), _pct(figures["b"][key]))
    for key in ("p50_ms", "p95_ms"):
        table.add_row(f"{key[:3]} ms (95% CI)", _ms(figures["a"][key]), _ms(figures["b"][key]))
    for feature, test_result in test["comparison"].get("outputs", {}).items():
        top = [max(range(len(p)), key=p.__getitem__) if p else "-"
               for p in (figures[v]["outputs"][feature]["proportions"] for v in "ab")]  # fmt: skip
        table.add_row(f"{escape(feature)} (top class; G-test p={test_result['p_value']:.3g})", str(top[0]), str(top[1]))
    out().print(table)
    configured = observed["configured"] * 100
    share = "-" if observed["value"] is None else f"{observed['value'] * 100:.2f}%"
    out().print(f"split: {share} of {observed['calls']} calls on B (configured {configured:g}%)")
    out().print(f"verdict: {escape(test['verdict'])}")


@ab_app.command("promote")
def promote(test_id: TestId, hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"),
            as_json: AsJson = False) -> None:  # fmt: skip
    """End the test with B as the model's version on every device it ran on."""
    _end(test_id, "promote", hub, token, state_dir, as_json)


@ab_app.command("stop")
def stop(test_id: TestId, hub: HubUrl = None, token: Token = None, state_dir: StateDir = Path("hub-state"),
         as_json: AsJson = False) -> None:  # fmt: skip
    """End the test with A alone on every device it ran on."""
    _end(test_id, "stop", hub, token, state_dir, as_json)


def _end(test_id: str, action: str, hub: str | None, token: str | None, state_dir: Path, as_json: bool) -> None:
    admin = client(hub, token, state_dir)
    test = run(lambda: admin.request("POST", f"/v1/ab/{test_id}/{action}"))
    if as_json:
        print(json.dumps(test, indent=2))
        return
    kept = test["b"] if action == "promote" else test["a"]
    out().print(f"A/B test {test_id} {test['state']}: {test['model']}@{kept} on {len(test['devices'])} devices "
                f"(deployment {test['deployments'][-1] if test['deployments'] else '-'})")  # fmt: skip
