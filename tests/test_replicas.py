"""Two hub replicas (`cloud-hub serve --replica`, each its own process) on one Mosquitto, one PostgreSQL
database and one S3 bucket (moto's server) with 20 real agents: telemetry from all of them stored exactly
once, both replicas taking their share; deploys and `cloud-hub` commands work against either, each
serving every model; the leader killed (SIGKILL) mid-rollout is replaced within a few seconds and the
other replica finishes the rollout."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from common import HubProcess, MosquittoProcess, artifact, gemm_onnx
from pg_server import fresh_database
from rollout_fleet import Device, start_fleet, wait_until
from typer.testing import CliRunner

from cloud_hub.api_client import AdminClient
from cloud_hub.artifacts_s3 import make_client
from cloud_hub.cli import app as hub_cli
from cloud_hub.registry import open_registry
from edge_agent.cloud import CloudClient

AGENTS = 20
MODEL = "gemm"
LEADER_TTL_S = 2.0
# 20 agents, 2 hubs, PostgreSQL and S3 on 2 cores: a 1 ms model's p95 swings 2x from one second to the
# next, so the rollout here is judged on its errors (what this test is about is who drives it)
LOOSE_LATENCY = {"max_p95_ratio": 20.0, "max_breach_ratio": 20.0, "max_fallback_ratio": 20.0, "max_drift_score": None}


class Replicas:
    """Mosquitto, one PostgreSQL database, replicas ``a`` and ``b`` (b's state directory a copy of a's:
    the hub key, the operator token, the trusted keys), 20 agents, versions 1.0.0 and 1.1.0 registered."""

    def __init__(self, work: Path, keys: tuple[Path, Path], database: str, s3_endpoint: str) -> None:
        self.work, self.database, self.s3_endpoint = work, database, s3_endpoint
        self.bucket = f"edgefed-{uuid.uuid4().hex[:12]}"
        make_client(s3_endpoint, None).create_bucket(Bucket=self.bucket)
        self.broker = MosquittoProcess(work)
        self.hubs: dict[str, HubProcess] = {}
        self.devices: list[Device] = []
        self.registry = open_registry(database)
        try:
            self._start(keys)
        except BaseException:
            self.stop()
            raise

    def _start(self, keys: tuple[Path, Path]) -> None:
        self.hubs["a"] = self._replica("a", keys[1])
        local = shutil.ignore_patterns("registry.db*", "*.log", "artifact-cache")  # a replica's own files
        shutil.copytree(self.work / "a", self.work / "b", ignore=local)
        self.hubs["b"] = self._replica("b", keys[1])
        fleet_view = SimpleNamespace(config=SimpleNamespace(state_dir=self.work / "a"), registry=self.registry,
                                     broker_url=self.broker.url)  # fmt: skip
        self.devices = start_fleet(fleet_view, self.work / "fleet", keys, AGENTS, telemetry_interval_s=0.3)
        reference = np.random.default_rng(1).standard_normal((256, 32)).astype(np.float32)
        for release in (1, 2):
            version = f"1.{release - 1}.0"
            directory = artifact(self.work, MODEL, partial(gemm_onnx, seed=release), ["batch", 32], ["batch", 30],
                                 keys[0], reference, dirname=version, version=version, release=release)  # fmt: skip
            self.hubs["a" if release == 1 else "b"].add(directory)  # each replica registers one

    def _replica(self, name: str, trust: Path) -> HubProcess:
        return HubProcess(self.work, trust, "--registry", self.database, "--artifacts", f"s3://{self.bucket}/hub",
                          "--s3-endpoint", self.s3_endpoint, "--replica", name, "--leader-ttl", str(LEADER_TTL_S),
                          "--serving-profile", "x86-64-generic", broker=self.broker.url,
                          state=self.work / name)  # fmt: skip

    def admin(self, name: str) -> AdminClient:
        return self.hubs[name].admin

    def leader(self) -> str | None:
        leading = [
            n
            for n, h in self.hubs.items()
            if h.process.poll() is None and self.admin(n).request("GET", "/v1/status")["leader"]
        ]
        assert len(leading) <= 1, f"two leaders at once: {leading}"
        return leading[0] if leading else None

    def cli(self, name: str, *args: str) -> str:
        hub = self.hubs[name]
        result = CliRunner().invoke(hub_cli, [*args, "--hub", f"http://127.0.0.1:{hub.admin_port}",
                                              "--state-dir", str(hub.state)])  # fmt: skip
        assert result.exit_code == 0, result.output
        return str(result.stdout)

    def deployed(self) -> None:
        """1.0.0 active on every agent (deployed through replica b, if no test did it yet)."""
        if not self.active_everywhere("1.0.0"):
            rows = json.loads(self.cli("b", "deploy", f"{MODEL}@1.0.0", "--to", "group:fleet", "--json"))
            assert len(rows) == AGENTS
            wait_until("1.0.0 active on every agent", lambda: self.active_everywhere("1.0.0"), 120)

    def active_everywhere(self, version: str) -> bool:
        return all(d.active_version(MODEL) == version for d in self.devices)

    def stop(self) -> None:
        for device in self.devices:
            device.stop()
        for hub in self.hubs.values():
            if hub.process.poll() is None:
                hub.stop()
        self.registry.close()
        self.broker.stop()


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path], postgres_admin: str, s3_endpoint: str
) -> Iterator[Replicas]:
    with fresh_database(postgres_admin) as database:
        stack = Replicas(tmp_path_factory.mktemp("replicas"), keys, database, s3_endpoint)
        try:
            yield stack
        finally:
            stack.stop()


def stored_batches(registry: Any, device_id: str) -> list[tuple[str, int]]:
    return [(t["epoch"], t["seq"]) for t in registry.telemetry(device_id)]


def test_one_replica_leads_and_each_serves_every_model(replicas: Replicas) -> None:
    wait_until("a leader", lambda: replicas.leader() is not None, 15)
    rows = np.random.default_rng(3).standard_normal((2, 32)).astype(np.float32)
    answers = {}
    for name, hub in replicas.hubs.items():
        versions = {a["version"] for a in replicas.admin(name).request("GET", f"/v1/models/{MODEL}")["artifacts"]}
        assert versions == {"1.0.0", "1.1.0"}, name
        for version in versions:  # each registered through one replica, served by both (from the bucket)
            cloud = CloudClient(hub.url, timeout_s=30)
            try:
                answered, outputs = cloud.infer(MODEL, {"input": rows}, version)
            finally:
                cloud.close()
            assert answered == version
            answers[name, version] = next(iter(outputs.values()))
    for version in ("1.0.0", "1.1.0"):
        np.testing.assert_allclose(answers["a", version], answers["b", version], rtol=1e-6)
    assert not np.allclose(answers["a", "1.0.0"], answers["a", "1.1.0"])


def test_a_deploy_through_either_replica_reaches_every_agent(replicas: Replicas) -> None:
    replicas.deployed()  # through replica b; the leader (either) serves the chunks
    listed = {name: {d["device_id"] for d in json.loads(replicas.cli(name, "devices", "list", "--json"))}
              for name in replicas.hubs}  # fmt: skip
    assert listed["a"] == listed["b"] == {d.device_id for d in replicas.devices}


def test_telemetry_from_every_agent_is_stored_exactly_once(replicas: Replicas) -> None:
    replicas.deployed()
    for device in replicas.devices:
        device.start_app(MODEL, rate=40.0)
    time.sleep(6.0)
    for device in replicas.devices:
        device.stop_app()  # the app stops calling; the agent goes on uploading what is spooled

    def drained() -> bool:
        return all(d.agent.spool.pending_calls() == 0 and d.agent.spool.unacknowledged() == 0 for d in replicas.devices)

    wait_until("every agent's telemetry acknowledged", drained, 60)
    calls = 0
    for device in replicas.devices:
        sent = device.agent.spool.counters()["seq"]
        stored = stored_batches(replicas.registry, device.device_id)
        assert len(stored) == len(set(stored)), f"{device.device_id}: a batch stored twice"
        assert sorted(seq for _, seq in stored) == list(range(1, sent + 1)), f"{device.device_id}: lost batches"
        calls += sum(w["count"] for t in replicas.registry.telemetry(device.device_id) for w in t["windows"])
    assert calls == sum(d.calls + d.errors for d in replicas.devices)  # every call counted once
    shares = {name: replicas.admin(name).request("GET", "/v1/status")["telemetry_stored"] for name in replicas.hubs}
    assert all(share > 0 for share in shares.values()), f"one replica stored everything: {shares}"


def test_a_killed_leader_is_replaced_and_the_other_replica_finishes_the_rollout(replicas: Replicas) -> None:
    replicas.deployed()
    wait_until("a leader", lambda: replicas.leader() is not None, 15)
    leader = replicas.leader()
    assert leader is not None
    other = "b" if leader == "a" else "a"
    for device in replicas.devices:
        device.start_app(MODEL, rate=40.0)
    gates = {"min_calls": 50, "min_soak_s": 2, **LOOSE_LATENCY}
    request = {"model": MODEL, "version": "1.1.0", "target": "group:fleet", "strategy": "waves",
               "waves": ["10%", "50%", "100%"], "gates": gates}  # fmt: skip
    rollout = replicas.admin(other).request("POST", "/v1/rollouts", json.dumps(request).encode())  # the follower
    rollout_id = rollout["id"]

    def first_wave_installed() -> bool:
        return sum(d.active_version(MODEL) == "1.1.0" for d in replicas.devices) >= 2

    wait_until("the first wave on 1.1.0", first_wave_installed, 120)
    killed_at = time.monotonic()
    replicas.hubs[leader].kill()
    wait_until(f"replica {other} to lead", lambda: replicas.leader() == other, 5 * LEADER_TTL_S + 10)
    took_over_s = time.monotonic() - killed_at
    print(f"replica {other} leads {took_over_s:.1f} s after the leader was killed (lease {LEADER_TTL_S} s)")
    assert took_over_s <= 3 * LEADER_TTL_S + 5, f"the lease passed after {took_over_s:.1f} s"

    def finished() -> bool:
        return str(replicas.admin(other).request("GET", f"/v1/rollouts/{rollout_id}")["state"]) in (
            "succeeded", "failed", "rolled-back", "aborted")  # fmt: skip

    wait_until("the rollout to finish on the surviving replica", finished, 240)
    final = replicas.admin(other).request("GET", f"/v1/rollouts/{rollout_id}")
    assert final["state"] == "succeeded", (final["reason"], final["events"][-6:])
    wait_until("1.1.0 active on every agent", lambda: replicas.active_everywhere("1.1.0"), 120)
    for device in replicas.devices:
        device.stop_app()
