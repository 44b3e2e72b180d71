"""Rollouts (issue 13) on real parts: a hub on Mosquitto, real agents with apps calling the SDK, waves
judged by health gates on the telemetry the agents send."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from common import artifact, flaky_gemm_onnx, gemm_onnx, slow_gemm_onnx
from conftest import MosquittoProcess
from rollout_fleet import Device, wait_until
from test_hub_restarts import admin, start_hub

from cloud_hub.desired_signing import HUB_KEY_DIR, HUB_KEY_NAME
from cloud_hub.rollouts import RolloutSpec, SpecError
from cloud_hub.server import Hub

GATES = {"min_calls": 150, "min_soak_s": 1.0}


@pytest.fixture
def fleet(hub: Hub, tmp_path: Path, keys: tuple[Path, Path]) -> Iterator[list[Device]]:
    devices = []
    hub_key = (hub.config.state_dir / HUB_KEY_DIR / f"{HUB_KEY_NAME}.pub").read_bytes()
    for i in range(4):
        hub.registry.upsert_device(f"dev-{i}", profile="x86-64-generic", groups=["fleet"])
        devices.append(Device(tmp_path / "fleet", f"dev-{i}", hub.broker_url, keys, "fleet", hub_key))
    yield devices
    for device in devices:
        device.stop()


def add(hub: Hub, tmp_path: Path, keys: tuple[Path, Path], release: int, model: Callable[[Path], None]) -> str:
    version = f"1.{release}.0"
    directory = artifact(tmp_path, "gemm", model, ["batch", 32], ["batch", 30], keys[0], dirname=version,
                         version=version, release=release)  # fmt: skip
    admin(hub).add_artifact(directory)
    return version


def running_v1(hub: Hub, fleet: list[Device], tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """Version 1.1.0 on every device, apps calling it, and enough of its telemetry at the hub."""
    version = add(hub, tmp_path, keys, 1, gemm_onnx)
    admin(hub).deploy("gemm", version, "group:fleet")
    wait_until("1.1.0 everywhere", lambda: all(d.active_version("gemm") == version for d in fleet))
    for device in fleet:
        device.start_app("gemm")
    wait_until("1.1.0's telemetry", lambda: calls(hub, version) >= 4 * GATES["min_calls"])


def calls(hub: Hub, version: str) -> int:
    hub.rollouts.tally.catch_up()
    return sum(t.calls for (model, v, _), t in hub.rollouts.tally.totals.items() if (model, v) == ("gemm", version))


def rollout(hub: Hub, version: str, **extra: Any) -> dict[str, Any]:
    request = {"model": "gemm", "version": version, "target": "group:fleet", "strategy": "waves",
               "waves": ["1", "2", "100%"], "gates": GATES, **extra}  # fmt: skip
    return dict(admin(hub).request("POST", "/v1/rollouts", json.dumps(request).encode()))


def final(hub: Hub, rollout_id: str, timeout_s: float = 90.0) -> dict[str, Any]:
    state: dict[str, Any] = {}

    def done() -> bool:
        state.update(hub.rollouts.get(rollout_id))
        return state["state"] in ("succeeded", "failed", "rolled-back", "aborted")

    wait_until(f"rollout {rollout_id} to end", done, timeout_s)
    return state


def test_a_good_version_goes_through_every_wave(hub: Hub, fleet: list[Device], tmp_path: Path,
                                                keys: tuple[Path, Path]) -> None:  # fmt: skip
    running_v1(hub, fleet, tmp_path, keys)
    good = add(hub, tmp_path, keys, 2, partial(gemm_onnx, seed=1))
    started = rollout(hub, good)
    assert [len(w["devices"]) for w in started["waves"]] == [1, 1, 2] and started["state"] == "running"
    ended = final(hub, started["id"])
    assert ended["state"] == "succeeded", ended["events"]
    assert all(w["verdict"]["passed"] for w in ended["waves"]), [w["verdict"] for w in ended["waves"]]
    wait_until("every store on the new version", lambda: all(d.active_version("gemm") == good for d in fleet), 30)

    def hub_agrees() -> bool:
        reported = {d["device_id"]: d["reported"] for d in admin(hub).request("GET", "/v1/devices")}
        return all(any(m["version"] == good and m["state"] == "active" for m in r["models"])
                   for r in reported.values())  # fmt: skip

    wait_until("the hub to see every device on it", hub_agrees, 30)


@pytest.mark.parametrize("model, why", [(partial(flaky_gemm_onnx, above=0.5), "error rate"),
                                        (slow_gemm_onnx, "p95 latency")])  # fmt: skip
def test_a_bad_version_is_stopped_at_the_canary_wave(hub: Hub, fleet: list[Device], tmp_path: Path,
                                                     keys: tuple[Path, Path], model: Callable[[Path], None],
                                                     why: str) -> None:  # fmt: skip
    running_v1(hub, fleet, tmp_path, keys)
    bad = add(hub, tmp_path, keys, 2, model)
    started = rollout(hub, bad, on_failure="halt")
    canary = started["waves"][0]["devices"]
    ended = final(hub, started["id"])
    assert ended["state"] == "failed" and why in ended["reason"], ended["reason"]
    assert ended["current_wave"] == 0
    assert [w["deployment_id"] is not None for w in ended["waves"]] == [True, False, False]
    assert {d.device_id for d in fleet if d.active_version("gemm") == bad} == set(canary)  # no one else


def test_a_failing_canary_is_rolled_back_automatically_and_everyone_ends_where_the_hub_says(
    hub: Hub, fleet: list[Device], tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    running_v1(hub, fleet, tmp_path, keys)
    bad = add(hub, tmp_path, keys, 2, partial(flaky_gemm_onnx, above=0.5))
    started = rollout(hub, bad)  # on_failure: rollback (the default)
    canary = started["waves"][0]["devices"]
    ended = final(hub, started["id"])
    assert ended["state"] == "rolled-back" and "error rate" in ended["reason"], ended["events"]
    assert "1 devices sent back (1 to 1.1.0)" in ended["events"][-1]["event"]
    wait_until("the canary back on 1.1.0", lambda: all(d.active_version("gemm") == "1.1.0" for d in fleet), 30)
    reported = {d["device_id"]: d["reported"] for d in admin(hub).request("GET", "/v1/devices")}
    wait_until("the hub to see it", lambda: all(
        any(m["version"] == "1.1.0" and m["state"] == "active" for m in admin(hub).request(
            "GET", f"/v1/devices/{device}")["reported"]["models"]) for device in canary))  # fmt: skip
    assert set(reported) == {d.device_id for d in fleet}


def test_pause_resume_and_abort_are_checked_against_the_state(hub: Hub, fleet: list[Device], tmp_path: Path,
                                                              keys: tuple[Path, Path]) -> None:  # fmt: skip
    running_v1(hub, fleet, tmp_path, keys)
    version = add(hub, tmp_path, keys, 2, partial(gemm_onnx, seed=1))
    started = rollout(hub, version, pause_s=600)
    assert hub.rollouts.pause(started["id"])["state"] == "paused"
    with pytest.raises(Exception, match="is paused: it cannot be paused"):
        hub.rollouts.pause(started["id"])
    assert hub.rollouts.resume(started["id"])["state"] == "running"
    with pytest.raises(Exception, match=r"rollout \w+ of gemm is under way"):
        rollout(hub, version)
    assert hub.rollouts.abort(started["id"])["state"] == "aborted"
    assert hub.rollouts.get(started["id"])["events"][-1]["event"].startswith("aborted by the operator")


def test_a_rollout_spec_names_what_is_wrong() -> None:
    base = {"model": "m", "version": "1", "target": "group:g"}
    with pytest.raises(SpecError, match="strategy 'fast': use one of all, canary, waves"):
        RolloutSpec.from_json({**base, "strategy": "fast"})
    with pytest.raises(SpecError, match="wave size 'five%'"):
        RolloutSpec.from_json({**base, "waves": ["five%"]})
    with pytest.raises(SpecError, match="gates: unknown max_errors"):
        RolloutSpec.from_json({**base, "gates": {"max_errors": 1}})
    devices = [f"d{i}" for i in range(100)]
    plan = RolloutSpec.from_json({**base, "waves": ["5%", "25%", "100%"]}).plan(devices, "r1")
    assert [len(w) for w in plan] == [5, 20, 75] and sorted(d for w in plan for d in w) == sorted(devices)
    assert plan == RolloutSpec.from_json({**base, "waves": ["5%", "25%", "100%"]}).plan(devices, "r1")  # stable
    canary = RolloutSpec.from_json({**base, "strategy": "canary", "canary": "device:d7,d9"}).plan(devices, "r2")
    assert canary[0] == ["d7", "d9"] and len(canary[1]) == 98
    assert [len(w) for w in RolloutSpec.from_json({**base, "waves": ["30%"]}).plan(devices[:3], "r")] == [1, 2]
    with pytest.raises(SpecError, match="device:d7,typo: typo not in the target"):  # never a canary-less rollout
        RolloutSpec.from_json({**base, "strategy": "canary", "canary": "device:d7,typo"}).plan(devices, "r3")
    with pytest.raises(SpecError, match="must be a finite number"):
        RolloutSpec.from_json({**base, "gates": {"max_p95_ratio": float("nan")}})
    with pytest.raises(SpecError, match="finite numbers"):
        RolloutSpec.from_json({**base, "wave_timeout_s": float("nan")})


def test_a_rollout_resumes_where_it_was_after_a_hub_restart(
    mosquitto: MosquittoProcess, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    hub = start_hub(tmp_path / "hub", keys, broker=mosquitto.url, grpc_port=0, admin_port=0)
    hub_key = (hub.config.state_dir / HUB_KEY_DIR / f"{HUB_KEY_NAME}.pub").read_bytes()
    devices = []
    try:
        for i in range(3):
            hub.registry.upsert_device(f"dev-{i}", profile="x86-64-generic", groups=["fleet"])
            devices.append(Device(tmp_path / "fleet", f"dev-{i}", mosquitto.url, keys, "fleet", hub_key))
        running_v1(hub, devices, tmp_path, keys)
        version = add(hub, tmp_path, keys, 2, partial(gemm_onnx, seed=1))
        started = rollout(hub, version, waves=["1", "100%"], pause_s=4)
        wait_until("the first wave to pass", lambda: hub.rollouts.get(started["id"])["current_wave"] == 1)
        hub.stop()  # between the waves
        hub = start_hub(tmp_path / "hub", keys, broker=mosquitto.url, grpc_port=0, admin_port=0)
        ended = final(hub, started["id"])
        assert ended["state"] == "succeeded", ended["events"]
        assert [len(w["devices"]) for w in ended["waves"]] == [1, 2]  # the same plan
        assert all(d.active_version("gemm") == version for d in devices)
    finally:
        for device in devices:
            device.stop()
        hub.stop()
