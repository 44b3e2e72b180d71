"""The hub's stores on the registry's database (cloud_hub/sqldb.py): on a fresh PostgreSQL database, each
store's core behaviour, two instances ("replicas") sharing their records, desired-state counters that two
signers never reuse or lower, and a hub with a PostgreSQL registry keeping its stores there."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import free_port

from cloud_hub import ab
from cloud_hub.ab import AbTests
from cloud_hub.alerts import AlertStore
from cloud_hub.auth import OPERATOR, VIEWER, TokenStore
from cloud_hub.desired_signing import DesiredSigner
from cloud_hub.drift.store import ClosedWindow, DriftStore, SavedStream
from cloud_hub.enroll_grants import ReenrollGrants
from cloud_hub.errors import Conflict, NotFound
from cloud_hub.metrics import HubCollector
from cloud_hub.registry_pg import PostgresRegistry
from cloud_hub.rollouts.store import RolloutStore
from cloud_hub.server import Hub, HubConfig
from cloud_hub.sqldb import PostgresDb, SqlDb, SqliteDb, to_psycopg
from edge_agent.protocol.messages import LATENCY_EDGES_MS, DesiredState, TelemetryBatch, TelemetryWindow


@pytest.fixture
def pg(postgres_url: str) -> Iterator[SqlDb]:
    registry = PostgresRegistry(postgres_url)
    yield registry.sql_db()
    registry.close()


def test_placeholders_become_psycopg_ones_outside_quoted_strings() -> None:
    assert to_psycopg("SELECT a FROM t WHERE b = ? AND c LIKE 'x%?' AND d = ?") == (
        "SELECT a FROM t WHERE b = %s AND c LIKE 'x%%?' AND d = %s"
    )


def test_tokens(pg: SqlDb) -> None:
    store = TokenStore(pg, "bootstrap-secret")
    made = store.create("ci", VIEWER)
    principal = store.resolve(made["token"])
    assert principal is not None and (principal.name, principal.role) == ("ci", VIEWER)
    assert store.resolve("bootstrap-secret") == store.resolve("bootstrap-secret")
    assert store.resolve("nope") is None
    with pytest.raises(Conflict, match="exists"):
        TokenStore(pg, "x").create("ci", OPERATOR)  # a second replica sees the name taken
    assert [t["name"] for t in store.list_tokens()] == ["ci"] and store.list_tokens()[0]["last_used"]
    store.revoke("ci")
    assert store.resolve(made["token"]) is None
    with pytest.raises(Conflict, match="already revoked"):
        store.revoke("ci")
    with pytest.raises(Conflict, match="was revoked"):
        store.create("ci", VIEWER)
    with pytest.raises(NotFound):
        store.revoke("ghost")


def test_alerts_raise_dedup_resolve(pg: SqlDb) -> None:
    store, other = AlertStore(pg), AlertStore(pg)
    events: list[tuple[str, int]] = []
    store.subscribe(lambda event, alert: events.append((event, alert.id)))
    first, opened = store.raise_alert("drift:m@1:all:x", "drift", "warning", "m", "1", "all", "drifts", {"s": 1})
    again, reopened = other.raise_alert("drift:m@1:all:x", "drift", "critical", "m", "1", "all", "worse")
    assert opened and not reopened and again.id == first.id and again.count == 2 and again.severity == "critical"
    assert store.counts() == {("drift", "critical", "open"): 1}
    assert other.ack(first.id, "alice").state == "acknowledged"
    with pytest.raises(Conflict, match="already acknowledged"):
        store.ack(first.id, "bob")
    assert store.resolve(first.id, "bob").resolved_by == "bob"
    fresh, opened = store.raise_alert("drift:m@1:all:x", "drift", "info", "m", "1", "all", "again")
    assert opened and fresh.id != first.id
    assert [a.id for a in other.list("all")] == [fresh.id, first.id] and other.list("active")[0].id == fresh.id
    assert events == [("opened", first.id), ("resolved", first.id), ("opened", fresh.id)]
    with pytest.raises(NotFound):
        store.get("42x")


def test_alerts_raised_together_by_two_replicas_make_one_alert(pg: SqlDb, postgres_url: str) -> None:
    second = PostgresDb.connect(postgres_url)  # another process's pool
    stores = [AlertStore(pg), AlertStore(second)]
    threads = [threading.Thread(target=lambda s=s: [s.raise_alert("k", "errors", "warning", "m", "1", "all", "x")
                                                    for _ in range(10)]) for s in stores * 2]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (alert,) = stores[0].list("all")
    assert alert.count == 40
    second.close()


def test_a_rollout_saved_by_one_replica_is_continued_by_another(pg: SqlDb) -> None:
    one, two = RolloutStore(pg), RolloutStore(pg)
    spec = {"model": "m", "version": "2", "target": "group:lab", "strategy": "canary"}
    rollout = one.create(spec, [["d1"], ["d2", "d3"]], {"d1": "1", "d2": None, "d3": "1"}, "r1")
    picked = two.get("r1")
    assert picked.to_json() == rollout.to_json() and [r.id for r in two.list(("running",))] == ["r1"]
    picked.current, picked.state = 1, "succeeded"
    picked.waves[0].deployment_id = "dep-1"
    picked.event("wave 1 passed")
    two.save(picked)
    again = one.get("r1")
    assert (again.state, again.current, again.waves[0].deployment_id) == ("succeeded", 1, "dep-1")
    assert one.list(("running",)) == [] and again.events[-1]["event"] == "wave 1 passed"
    with pytest.raises(NotFound):
        one.get("r2")


def test_a_rollout_change_never_overwrites_another_replicas(pg: SqlDb) -> None:
    """The leader read the rollout, an operator aborted it on another replica, the leader saves its next
    wave: refused (Conflict), and the abort stands; read again, the leader's change can be made."""
    leader, operator = RolloutStore(pg), RolloutStore(pg)
    spec = {"model": "m", "version": "2", "target": "group:lab", "strategy": "canary"}
    leader.create(spec, [["d1"], ["d2"]], {"d1": "1", "d2": "1"}, "r1")
    stepping, aborting = leader.get("r1"), operator.get("r1")
    aborting.state = "aborted"
    operator.save(aborting)
    stepping.current = 1
    with pytest.raises(Conflict):
        leader.save(stepping)
    assert (leader.get("r1").state, leader.get("r1").current) == ("aborted", 0)
    again = leader.get("r1")
    again.event("seen")
    leader.save(again)
    assert leader.get("r1").events[-1]["event"] == "seen"


def test_ab_tests_are_shared(pg: SqlDb, monkeypatch: pytest.MonkeyPatch) -> None:
    class Registry:
        def artifact(self, artifact_id: str) -> dict[str, Any]:
            return {"manifest": {"id": artifact_id}, "signature": {"sig": artifact_id}}

    hub = type("FakeHub", (), {"registry": Registry()})()
    one = AbTests(hub, pg)
    pg.execute(
        "INSERT INTO ab_tests (id, model, a, b, split, target, devices, state, created, deployments) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, '[]')",
        ["t1", "m", "1", "2", 10.0, "group:lab", json.dumps({"d1": {"a": "art-a", "b": "art-b"}}), time.time()],
    )
    two = AbTests(hub, pg)  # a replica that starts after the test began
    side = two.desired_ab("d1", "m", "1")
    assert side is not None and (side.ab_id, side.artifact_id, side.split) == ("t1", "art-b", 10.0)
    assert two.desired_ab("d2", "m", "1") is None and two.desired_ab("d1", "m", "2") is None
    assert one.desired_ab("d1", "m", "1") is None  # its view (from before the test) is under 2 s old
    monkeypatch.setattr(ab, "RUNNING_REREAD_S", 0.0)
    assert one.desired_ab("d1", "m", "1") is not None  # re-read: the test the other replica started
    two._update("t1", state="stopped", ended=time.time(), deployments=["dep-9"])
    assert one.get("t1")["state"] == "stopped" and one.get("t1")["deployments"] == ["dep-9"]
    assert [t["id"] for t in one.tests()] == ["t1"] and two.desired_ab("d1", "m", "1") is None
    assert one.desired_ab("d1", "m", "1") is None  # re-read: the other replica stopped it
    with pytest.raises(NotFound):
        one.get("t2")


def test_reenroll_grants(pg: SqlDb) -> None:
    ReenrollGrants(pg).add("sha-1", "dev-7")
    grants = ReenrollGrants(pg)
    assert grants.device_for("sha-1") == "dev-7" and grants.device_for("sha-2") is None


def test_drift_cursor_streams_and_windows(pg: SqlDb) -> None:
    store = DriftStore(pg, retention_windows=2)
    assert store.cursor() == 0 and store.streams() == []
    key = ("m", "1", "all")
    windows = [ClosedWindow(key, float(i), 200, 0.5 * i, 1.0, i == 2, ["x"] if i == 2 else [], {"x": {"psi": i}})
               for i in range(3)]  # fmt: skip
    store.save(7, [SavedStream(key, {"cusum": 1.5}, {"x": [1, 2]}, 30)], windows)
    store.save(9, [SavedStream(key, {"cusum": 0.5}, {"x": [3]}, 40)], [])
    other = DriftStore(pg)
    assert other.cursor() == 9 and other.streams() == [SavedStream(key, {"cusum": 0.5}, {"x": [3]}, 40)]
    kept = other.windows("m")
    assert [w.at for w in kept] == [1.0, 2.0] and kept[1].alarm and kept[1].features == {"x": {"psi": 2}}
    assert other.versions("m") == ["1"] and other.windows("m", "2") == []


def sign_concurrently(signers: list[DesiredSigner], threads_per_signer: int, each: int) -> list[list[int]]:
    """Every thread signs ``each`` new decisions for one device; the counters each thread got, in order."""
    got: list[list[int]] = []
    errors: list[BaseException] = []

    def sign(signer: DesiredSigner, name: str) -> None:
        mine: list[int] = []
        got.append(mine)
        try:
            for i in range(each):
                payload = signer.payload("dev-1", DesiredState(f"{name}-{i}", "2026-01-01T00:00:00Z", ()))
                mine.append(int(json.loads(payload)["counter"]))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=sign, args=(signer, f"s{n}-t{t}"))
               for n, signer in enumerate(signers) for t in range(threads_per_signer)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return got


def assert_counters_never_reused_or_lowered(got: list[list[int]], signer: DesiredSigner) -> None:
    every = [c for mine in got for c in mine]
    assert len(every) == len(set(every)), "a counter was handed out twice"
    for mine in got:
        assert mine == sorted(mine) and len(set(mine)) == len(mine), "a later signing got a lower counter"
    assert signer.counter("dev-1") == max(every)
    repeat = signer.payload("dev-1", DesiredState("next", "2026-01-01T00:00:00Z", ()))
    assert int(json.loads(repeat)["counter"]) > max(every)


def test_two_signers_on_one_postgresql_database_never_reuse_or_lower_a_counter(
    tmp_path: Path, pg: SqlDb, postgres_url: str
) -> None:
    second = PostgresDb.connect(postgres_url, max_connections=4)  # the other replica's own pool
    signers = [DesiredSigner(tmp_path, pg), DesiredSigner(tmp_path, second)]
    got = sign_concurrently(signers, threads_per_signer=4, each=15)
    assert_counters_never_reused_or_lowered(got, signers[1])
    second.close()


def test_two_signers_on_one_sqlite_file_never_reuse_or_lower_a_counter(tmp_path: Path) -> None:
    path = str(tmp_path / "registry.db")
    handles = [SqliteDb(path), SqliteDb(path)]  # two connections, as two processes would have
    signers = [DesiredSigner(tmp_path, handles[0]), DesiredSigner(tmp_path, handles[1])]
    got = sign_concurrently(signers, threads_per_signer=4, each=15)
    assert_counters_never_reused_or_lowered(got, signers[0])
    for handle in handles:
        handle.close()


def test_a_hub_on_postgresql_keeps_its_stores_there(tmp_path: Path, postgres_url: str) -> None:
    """With --registry postgresql://... the admin tokens, rollouts and the rest are in PostgreSQL, and
    STATE/registry.db has none of their tables."""
    state = tmp_path / "hub"
    hub = Hub(HubConfig(state, registry=postgres_url, broker_port=free_port(), grpc_port=0, admin_port=0))
    hub.start()
    try:
        assert hub.admin is not None
        made = hub.admin.tokens.create("ops", OPERATOR)
        hub.rollouts.store.create({"model": "m", "version": "1", "target": "all", "strategy": "all"}, [["d"]],
                                  {"d": None}, "r-hub")  # fmt: skip
        hub.alerts.raise_alert("k", "errors", "info", "m", "1", "all", "x")
    finally:
        hub.stop()
        hub.registry.close()
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT name FROM admin_tokens").fetchall() == [("ops",)]
        assert conn.execute("SELECT id FROM rollouts").fetchall() == [("r-hub",)]
        assert conn.execute("SELECT key FROM alerts").fetchall() == [("k",)]
    assert made["token"]
    stores = {"admin_tokens", "rollouts", "alerts", "desired_signed", "ab_tests", "enroll_reenroll", "drift_windows"}
    local = state / "registry.db"
    if local.exists():
        with sqlite3.connect(local) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert not tables & stores


def metric_samples(registry: Any) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The hub collector's samples over ``registry`` fed two devices' telemetry and cloud usage."""
    bins = len(LATENCY_EDGES_MS) + 1
    local = TelemetryWindow("m", "1.0.0", "local", 0.0, 1.0, 100, 2, 500.0, tuple(i % 3 for i in range(bins)), 7)
    cloud = TelemetryWindow("m", "1.0.0", "cloud", 0.0, 1.0, 10, 1, 200.0, (0,) * (bins - 1) + (10,))
    registry.upsert_device("dev-1", profile="p", status="online")
    registry.upsert_device("dev-2", profile="p", status="offline")
    registry.add_telemetry(TelemetryBatch("dev-1", 1, (local, cloud), dropped=3, epoch="e1"))
    registry.add_telemetry(TelemetryBatch("dev-2", 1, (local,), dropped=1, epoch="e2"))
    registry.add_usage({("dev-1", "m"): 5, ("dev-2", "m"): 1})
    collector = HubCollector(registry.sql_db(), Counter, None, lambda: [])
    list(collector.collect())  # a first scrape; the second reads only what is new (nothing)
    return {(s.name, frozenset(s.labels.items())): s.value for family in collector.collect() for s in family.samples}


def test_metrics_read_the_same_from_postgresql_as_from_sqlite(tmp_path: Path, postgres_url: str) -> None:
    from cloud_hub.registry import SQLiteRegistry

    on_sqlite, on_pg = SQLiteRegistry(str(tmp_path / "registry.db")), PostgresRegistry(postgres_url)
    try:
        expected, got = metric_samples(on_sqlite), metric_samples(on_pg)
    finally:
        on_sqlite.close()
        on_pg.close()
    assert (
        got[("edgefed_hub_calls_total", frozenset({"model": "m", "version": "1.0.0", "route": "local"}.items()))] == 200
    )
    assert got[("edgefed_hub_spool_dropped_total", frozenset({"device": "dev-1"}.items()))] == 3
    assert got == expected
