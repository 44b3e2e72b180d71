"""A/B tests (docs/ab.md): two versions of one model live on a target's devices, the calls split on each
device by the SDK, both versions' telemetry kept apart and compared.

    ab_tests   a table in the registry's database (``Registry.sql_db()``: SQLite's registry.db or
               PostgreSQL): id, model, a, b, split (percent of calls to B), target, devices
               ({device: {"a": artifact, "b": artifact}}), state (running | promoted | stopped), created,
               ended, deployments (the deployments it made), reason

``start`` records the test and deploys A to its devices with the B side in each device's signed desired
state (``DesiredModel.ab``, filled by ``desired_ab`` whenever the hub builds a desired state); ``promote``
deploys B (a signed rollback when B's release is below A's), ``stop`` deploys A alone. A later deploy of
another version of the model to a device ends the split there (the desired state names B only while the
device's desired version is A). ``status`` reads the telemetry the devices sent since the test started.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import defaultdict
from typing import Any

import numpy as np

from cloud_hub import ab_stats
from cloud_hub.auth import ACTOR
from cloud_hub.errors import Conflict, NotFound
from cloud_hub.registration import registered_interface
from cloud_hub.rollouts.gates import Totals
from cloud_hub.sqldb import Row, SqlDb, open_db
from edge_agent.protocol.messages import DesiredAB

MIN_CALLS = 100  # per version, before the verdict judges
RUNNING_REREAD_S = 2.0  # how stale this hub's view of running tests may get (another replica may change them)
_SCHEMA = """CREATE TABLE IF NOT EXISTS ab_tests (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, a TEXT NOT NULL, b TEXT NOT NULL, split {real} NOT NULL,
    target TEXT NOT NULL, devices TEXT NOT NULL, state TEXT NOT NULL, created {real} NOT NULL, ended {real},
    deployments TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '')"""


class Figures:
    """Telemetry of one test, per version: totals and class counts per output feature."""

    def __init__(self) -> None:
        self.totals: dict[str, Totals] = defaultdict(Totals)
        self.classes: dict[str, dict[str, np.ndarray]] = defaultdict(dict)


class AbTests:
    def __init__(self, hub: Any, db: SqlDb | str) -> None:
        """``db``: the registry's ``sql_db()``, or a SQLite file's path."""
        self.hub = hub
        self.db, self._owned = open_db(db)
        self._lock = threading.RLock()  # the running tests and the figures read so far
        self.db.ddl(sqlite=[_SCHEMA.format(real="REAL")], postgresql=[_SCHEMA.format(real="DOUBLE PRECISION")])
        self._running: dict[str, dict[str, Any]] = {}  # model → its running test
        self._read_at = 0.0
        self._load_running()
        self._cursor = 0
        self._figures: dict[str, Figures] = defaultdict(Figures)

    def close(self) -> None:
        if self._owned:
            self.db.close()

    # records -------------------------------------------------------------------------------------
    def _row(self, row: Row) -> dict[str, Any]:
        test = dict(row)
        test["devices"], test["deployments"] = json.loads(test["devices"]), json.loads(test["deployments"])
        return test

    def _load_running(self) -> None:
        rows = self.db.execute("SELECT * FROM ab_tests WHERE state = 'running'")
        with self._lock:
            self._running = {r["model"]: self._row(r) for r in rows}
            self._read_at = time.monotonic()

    def _running_test(self, model: str) -> dict[str, Any] | None:
        if time.monotonic() - self._read_at > RUNNING_REREAD_S:
            self._load_running()
        return self._running.get(model)

    def tests(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM ab_tests ORDER BY created DESC")
        return [self._row(r) for r in rows]

    def get(self, test_id: str) -> dict[str, Any]:
        rows = self.db.execute("SELECT * FROM ab_tests WHERE id = ?", [test_id])
        if not rows:
            raise NotFound(f"A/B test {test_id!r} is unknown; see 'cloud-hub ab list'")
        return self._row(rows[0])

    def _update(self, test_id: str, **fields: Any) -> None:
        fields = {k: json.dumps(v) if k in ("devices", "deployments") else v for k, v in fields.items()}
        self.db.execute(f"UPDATE ab_tests SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?",
                        [*fields.values(), test_id])  # fmt: skip
        self._load_running()

    # the desired-state hook -------------------------------------------------------------------------
    def desired_ab(self, device_id: str, model: str, version: str) -> DesiredAB | None:
        """The B side for ``device_id``'s desired state of ``model@version``: a running test whose A is
        that version and that covers the device; None otherwise."""
        test = self._running_test(model)
        if test is None or test["a"] != version or device_id not in test["devices"]:
            return None
        artifact_id = test["devices"][device_id]["b"]
        artifact = self.hub.registry.artifact(artifact_id)
        return DesiredAB(test["id"], test["b"], artifact_id, artifact["manifest"], artifact["signature"],
                         test["split"])  # fmt: skip

    # operations -----------------------------------------------------------------------------------
    def start(self, model: str, a: str, b: str, split: float, target: str) -> dict[str, Any]:
        """Check, record and deploy a test; Conflict naming the difference when A and B differ in interface."""
        if a == b:
            raise ValueError(f"--a and --b are both {a}: an A/B test needs two versions")
        if not 0 < split < 100:
            raise ValueError(f"split {split:g}: give the percent of calls for B, above 0 and below 100")
        self._check_interfaces(model, a, b)
        running = self._running_test(model)
        if running is not None:
            raise Conflict(f"A/B test {running['id']} of {model} ({running['a']} vs {running['b']}) is running; "
                           f"promote or stop it first ('cloud-hub ab stop {running['id']}')")  # fmt: skip
        control = self.hub.control
        devices = self.hub.registry.devices_matching(target)
        if not devices:
            raise NotFound(f"no device matches {target!r}; see 'cloud-hub devices list'")
        assigned = {d["device_id"]: {"a": control._artifact_for(model, a, d), "b": control._artifact_for(model, b, d)}
                    for d in devices}  # fmt: skip
        test_id = secrets.token_hex(4)
        with self._lock:
            self.db.execute(
                "INSERT INTO ab_tests (id, model, a, b, split, target, devices, state, created, deployments) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, '[]')",
                [test_id, model, a, b, float(split), target, json.dumps(assigned), time.time()],
            )
            self._load_running()
        try:
            result = control.deploy_devices(model, a, devices, f"ab:{test_id}")
        except Exception as exc:
            self._update(test_id, state="stopped", ended=time.time(), reason=f"could not deploy: {exc}")
            raise
        self._update(test_id, deployments=[result["deployment_id"]])
        self.hub.registry.audit(ACTOR.get(), "ab.start", {"id": test_id, "model": model, "a": a, "b": b,
                                                         "split": split, "target": target})  # fmt: skip
        return self.get(test_id)

    def _check_interfaces(self, model: str, a: str, b: str) -> None:
        interfaces = {}
        for version in (a, b):
            rows = self.hub.registry.artifacts(model, version)
            if not rows:
                raise NotFound(f"{model}@{version} has no artifact; add one with 'cloud-hub models add'")
            interfaces[version] = registered_interface(self.hub.registry.artifact(rows[0]["artifact_id"])["manifest"])
        differences = interfaces[a].differences(interfaces[b])
        if differences:
            raise Conflict(f"A/B test refused: {model}@{a} and {model}@{b} have different interfaces "
                           f"({'; '.join(differences)}); apps calling one model must get one contract, so both "
                           "versions of an A/B test must take and return the same tensors")  # fmt: skip

    def promote(self, test_id: str) -> dict[str, Any]:
        """B becomes the model's version on every device of the test."""
        test = self._ending(test_id, "promoted")
        control, devices = self.hub.control, self._devices(test)
        if not devices:
            raise Conflict(f"A/B test {test_id}: none of its devices is still registered")
        a_release = self.hub.registry.artifacts(test["model"], test["a"])[0]["release"]
        b_release = self.hub.registry.artifacts(test["model"], test["b"])[0]["release"]
        if b_release < a_release:  # going below the installed release needs the hub's signed word
            marks = {d["device_id"]: test["devices"][d["device_id"]]["b"] for d in devices}
            self.hub.desired_signer.mark_rollback(test["model"], marks)
        result = control.deploy_devices(test["model"], test["b"], devices, f"ab:{test_id}:promote")
        return self._ended(test, "promoted", result["deployment_id"])

    def stop(self, test_id: str) -> dict[str, Any]:
        """Back to A alone on every device of the test."""
        test = self._ending(test_id, "stopped")
        devices = self._devices(test)
        deployment = ""
        if devices:
            deployment = self.hub.control.deploy_devices(test["model"], test["a"], devices, f"ab:{test_id}:stop")[
                "deployment_id"
            ]
        return self._ended(test, "stopped", deployment)

    def _ending(self, test_id: str, state: str) -> dict[str, Any]:
        test = self.get(test_id)
        if test["state"] != "running":
            raise Conflict(f"A/B test {test_id} is {test['state']}: it cannot be {state} again")
        self._update(test_id, state=state, ended=time.time(), reason=f"{state} by the operator")
        return test

    def _ended(self, test: dict[str, Any], state: str, deployment_id: str) -> dict[str, Any]:
        self._update(test["id"], deployments=[*test["deployments"], deployment_id] if deployment_id else
                     test["deployments"])  # fmt: skip
        action = "ab.stop" if state == "stopped" else "ab.promote"
        self.hub.registry.audit(ACTOR.get(), action, {"id": test["id"], "deployment_id": deployment_id})
        return self.get(test["id"])

    def _devices(self, test: dict[str, Any]) -> list[dict[str, Any]]:
        found = []
        for device_id in test["devices"]:
            try:
                found.append(self.hub.registry.device(device_id))
            except NotFound:
                continue
        return found

    # figures ----------------------------------------------------------------------------------------
    def _catch_up(self) -> None:
        """Add the telemetry stored since the last call to every test it belongs to (time, device, version)."""
        tests = self.tests()
        while rows := self.hub.registry.telemetry_after(self._cursor, 2000):
            for row in rows:
                for test in tests:
                    if row["device_id"] in test["devices"]:
                        self._add(test, row)
            self._cursor = rows[-1]["cursor"]

    def _add(self, test: dict[str, Any], row: dict[str, Any]) -> None:
        versions, figures = (test["a"], test["b"]), self._figures[test["id"]]
        end = test["ended"] or float("inf")
        for w in row["windows"]:
            if w["model"] == test["model"] and w["version"] in versions and test["created"] <= w["start"] < end:
                totals = figures.totals[w["version"]]
                totals.calls, totals.errors = totals.calls + w["count"], totals.errors + w["errors"]
                if w["route"] == "cloud":
                    totals.cloud += w["count"]
                if w["route"] == "local":
                    totals.local += w["count"]
                    totals.breaches += w.get("budget_breaches", 0)
                    if len(w.get("latency_hist") or []) == len(totals.latency):
                        totals.latency = totals.latency + np.asarray(w["latency_hist"], np.int64)
        if not test["created"] <= row["received"] < end + 60:
            return
        for h in row["histograms"]:
            if h["model"] == test["model"] and h["version"] in versions and h["tensor"].endswith("/class"):
                counts = np.asarray(h["counts"], np.int64)
                known = figures.classes[h["tensor"]].get(h["version"])
                if known is None or len(known) != len(counts):
                    figures.classes[h["tensor"]][h["version"]] = counts
                else:
                    figures.classes[h["tensor"]][h["version"]] = known + counts

    def status(self, test_id: str) -> dict[str, Any]:
        """The test with, per version, calls, error and fallback rates, p50/p95 latency and the output
        distribution with 95 % intervals, B - A differences, the observed split and a verdict line."""
        test = self.get(test_id)
        with self._lock:
            self._catch_up()
            figures = self._figures[test_id]
            a, b = figures.totals[test["a"]], figures.totals[test["b"]]
            classes = {k: dict(v) for k, v in figures.classes.items()}
        per = {"a": _version_figures(test["a"], a), "b": _version_figures(test["b"], b)}
        comparison: dict[str, Any] = {
            "error_rate": ab_stats.difference((b.errors, b.calls), (a.errors, a.calls)),
            "fallback_rate": ab_stats.difference((b.cloud, b.calls), (a.cloud, a.calls)),
        }
        outputs = {}
        for feature, by_version in sorted(classes.items()):
            counts_a, counts_b = by_version.get(test["a"]), by_version.get(test["b"])
            if counts_a is not None and counts_b is not None and len(counts_a) == len(counts_b):
                per["a"].setdefault("outputs", {})[feature] = _distribution(counts_a)
                per["b"].setdefault("outputs", {})[feature] = _distribution(counts_b)
                outputs[feature] = ab_stats.homogeneity(counts_a.tolist(), counts_b.tolist())
        if outputs:
            comparison["outputs"] = outputs
        total = a.calls + b.calls
        observed = {**ab_stats.rate(b.calls, total), "configured": test["split"] / 100, "calls": total}
        line = ab_stats.verdict(test["a"], test["b"], per, comparison, MIN_CALLS)
        return {**test, "figures": per, "comparison": comparison, "observed_split": observed, "verdict": line}


def _version_figures(version: str, totals: Totals) -> dict[str, Any]:
    hist = totals.latency.tolist()
    return {"version": version, "calls": totals.calls, "local_calls": totals.local,
            "error_rate": ab_stats.rate(totals.errors, totals.calls),
            "fallback_rate": ab_stats.rate(totals.cloud, totals.calls),
            "budget_breaches": totals.breaches,
            "p50_ms": ab_stats.quantile(hist, 0.5), "p95_ms": ab_stats.quantile(hist, 0.95)}  # fmt: skip


def _distribution(counts: np.ndarray) -> dict[str, Any]:
    total = int(counts.sum())
    return {"counts": counts.tolist(), "proportions": (counts / total).tolist() if total else None,
            "samples": total}  # fmt: skip
