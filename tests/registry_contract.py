"""The Registry contract as one test class: every storage implementation (SQLite, PostgreSQL) subclasses
it and provides the ``registry`` fixture (tests/test_registry.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from conftest import make_artifact

from cloud_hub.errors import NotFound
from edge_agent.protocol.artifact import read_manifest
from edge_agent.protocol.messages import TelemetryBatch, TelemetryWindow
from edge_agent.protocol.signing import TrustStore


class RegistryContract:
    registry: Any

    def manifest(self, tmp_path: Path, keys: tuple[Path, Path], version: str, release: int) -> Any:
        artifact = make_artifact(tmp_path / version, keys[0], version=version, release=release, seed=release)
        return read_manifest(artifact, TrustStore.from_dir(keys[1].parent))

    def test_artifacts_are_idempotent_and_newest_first(self, tmp_path: Path, keys: tuple[Path, Path]) -> None:
        first, second = self.manifest(tmp_path, keys, "1.0.0", 1), self.manifest(tmp_path, keys, "2.0.0", 2)
        assert self.registry.add_artifact(first, {"sig": "a"}) and not self.registry.add_artifact(first, {"sig": "a"})
        self.registry.add_artifact(second, {"sig": "b"})
        assert [a["version"] for a in self.registry.artifacts("gemm")] == ["2.0.0", "1.0.0"]
        assert self.registry.artifact(first.artifact_id)["signature"] == {"sig": "a"}
        with pytest.raises(NotFound):
            self.registry.artifact("0" * 64)

    def test_devices_targets_and_removal(self) -> None:
        self.registry.upsert_device("a", profile="x86-64-generic", groups=["lab"], tags={"site": "paris"})
        self.registry.upsert_device("b", profile="x86-64-generic", groups=["lab", "edge"], tags={"site": "rome"})
        self.registry.upsert_device("a", status="online")  # a partial update keeps the rest
        assert self.registry.device("a")["groups"] == ["lab"] and self.registry.device("a")["status"] == "online"
        assert [d["device_id"] for d in self.registry.devices_matching("group:lab")] == ["a", "b"]
        assert [d["device_id"] for d in self.registry.devices_matching("tag:site=rome")] == ["b"]
        with pytest.raises(ValueError):
            self.registry.devices_matching("everything")
        self.registry.remove_device("a")
        with pytest.raises(NotFound):
            self.registry.device("a")
        assert not self.registry.update_from_device("a", status="online")  # a removed device stays out
        with pytest.raises(NotFound):
            self.registry.device("a")
        assert self.registry.update_from_device("b", status="offline")
        self.registry.upsert_device("a", profile="x86-64-generic")  # enrolled again
        assert self.registry.update_from_device("a", status="online")
        assert self.registry.device("a")["status"] == "online"

    def test_deployments_set_desired_state(self) -> None:
        self.registry.upsert_device("a", profile="x86-64-generic")
        first = self.registry.create_deployment("gemm", "1.0.0", "device:a", {"a": "1" * 64})
        self.registry.create_deployment("gemm", "2.0.0", "device:a", {"a": "2" * 64})
        assert [(d["model"], d["version"]) for d in self.registry.desired("a")] == [("gemm", "2.0.0")]
        assert first in [d["deployment_id"] for d in self.registry.deployments()]

    def test_telemetry_is_stored_once_per_sequence(self) -> None:
        window = TelemetryWindow("gemm", "1.0.0", "local", 1.0, 2.0, 3, 0, 0.3, (3,))
        batch = TelemetryBatch("a", 7, (window,))
        assert self.registry.add_telemetry(batch) and not self.registry.add_telemetry(batch)
        assert [t["seq"] for t in self.registry.telemetry("a")] == [7]

    def test_telemetry_of_a_new_spool_is_kept_apart_from_the_old_one(self) -> None:
        window = TelemetryWindow("gemm", "1.0.0", "local", 1.0, 2.0, 3, 0, 0.3, (3,))
        old_agent, first, again = (TelemetryBatch("a", 1, (window,), epoch=e) for e in ("", "e1", "e2"))
        assert self.registry.add_telemetry(old_agent) and self.registry.add_telemetry(first)
        assert self.registry.add_telemetry(again)  # the device re-initialised: seq 1 again, a new epoch
        assert not self.registry.add_telemetry(TelemetryBatch("a", 1, (window,), dropped=5, epoch="e2"))
        assert not self.registry.add_telemetry(TelemetryBatch("a", 1, (window,)))
        stored = self.registry.telemetry("a")
        assert sorted((t["epoch"], t["seq"]) for t in stored) == [("", 1), ("e1", 1), ("e2", 1)]
        assert sum(t["windows"][0]["count"] for t in stored) == 9 and {t["dropped"] for t in stored} == {0}

    def test_enrollment_tokens_are_single_use_and_expire(self) -> None:
        self.registry.add_enroll_token("t1", time.time() + 60, ["lab"], {"k": "v"})
        self.registry.add_enroll_token("t2", time.time() - 1, [], {})
        assert self.registry.use_enroll_token("t1", "a") == {"groups": ["lab"], "tags": {"k": "v"}}
        assert self.registry.use_enroll_token("t1", "b") is None
        assert self.registry.use_enroll_token("t2", "c") is None and self.registry.use_enroll_token("nope", "d") is None

    def test_tokens_usage_and_audit(self) -> None:
        self.registry.add_device_token("a", "h1")
        assert self.registry.token_owner("h1") == "a" and self.registry.token_owner("h2") is None
        self.registry.add_usage({("a", "gemm"): 2})
        self.registry.add_usage({("a", "gemm"): 3})
        assert self.registry.usage() == [{"device_id": "a", "model": "gemm", "calls": 5}]
        self.registry.audit("operator", "deploy", {"x": 1})
        self.registry.audit("rollouts", "rollback", {"y": [2]})
        log = self.registry.audit_log()
        assert [(e["actor"], e["action"], e["detail"]) for e in log] == [
            ("operator", "deploy", {"x": 1}), ("rollouts", "rollback", {"y": [2]})]  # fmt: skip
        assert self.registry.audit_log(limit=1) == log[1:] and log[0]["id"] < log[1]["id"]
        assert self.registry.audit_log(since=time.time() + 60) == []

    def test_a_lease_has_one_holder_until_it_expires_or_is_given_up(self) -> None:
        assert self.registry.try_lead("lead", "a", 0.5) and self.registry.try_lead("lead", "a", 0.5)  # renewed
        assert not self.registry.try_lead("lead", "b", 0.5)
        time.sleep(0.7)  # a's lease ran out without a renewal
        assert self.registry.try_lead("lead", "b", 30) and not self.registry.try_lead("lead", "a", 30)
        self.registry.resign("lead", "a")  # not the holder: nothing changes
        assert not self.registry.try_lead("lead", "a", 30)
        self.registry.resign("lead", "b")
        assert self.registry.try_lead("lead", "a", 30) and self.registry.try_lead("other", "b", 30)
