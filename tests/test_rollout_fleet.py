"""Issue 13, done-when: a rollout on 20 real agents on one broker. A bad version (a model that raises on
a fraction of its inputs, and separately one about 3x slower as the SDK measures it) is stopped at the
canary wave and rolled back automatically (a signed rollback from the hub); a good version goes through
every wave; at the end the hub's rollout records and every device's reported state agree.

The agents run in this process (``rollout_fleet.Device``: its own state dir and MQTT connection each),
each with an app calling the SDK 8 times a second; waves 20 %, 50 %, 100 % (4, 6 and 10 devices)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from common import artifact, flaky_gemm_onnx, slow_gemm_onnx
from rollout_fleet import (
    Device,
    hub_reports,
    installed_versions,
    latency_ms,
    start_fleet,
    wait_until,
)
from test_hub_restarts import admin

from cloud_hub.server import Hub

DEVICES, RATE = 20, 8.0
WAVES = ["20%", "50%", "100%"]
# the canary (4 devices x 8 calls/s) makes 320 calls in ~10 s, the holdout far more meanwhile. Sized for a
# shared 2-core machine: with 160 calls a good version's canary p95 came out at 4x the holdout's once (a
# few slow calls weigh a lot on a small sample), and p95 may be 2x (+ 0.05 ms) the previous version's
# rather than the default 1.5x; the slow version is ~3x, more under load
GATES = {"min_calls": 320, "min_soak_s": 1.0, "max_p95_ratio": 2.0}
# the normal model: Gemm through 50 MatMuls by one 512-wide matrix, ~0.5 ms a call (the 1k-parameter
# gemm_onnx takes ~0.01 ms, below the first edge of the telemetry's latency bins, 0.05 ms, and within
# the scheduling noise: no slowdown of it shows); the slow one: 180 such MatMuls, ~3x the time as the
# SDK measures it (median; more in the tail when the cores are contended), the same 1 MB artifact
NORMAL = partial(slow_gemm_onnx, width=512, layers=50, shared=True)
SLOW = partial(slow_gemm_onnx, width=512, layers=180, shared=True)


@pytest.fixture
def fleet(hub: Hub, tmp_path: Path, keys: tuple[Path, Path]) -> Iterator[list[Device]]:
    # 20 agents, their apps and the hub share this process's GIL (a real device runs one agent): with the
    # default 5 ms switch interval an app's call waits whole intervals for it after ONNX Runtime returns,
    # and those waits, not the model, would make the latency the gates compare
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    devices = start_fleet(hub, tmp_path / "fleet", keys, DEVICES, telemetry_interval_s=0.5)
    yield devices
    for device in devices:
        device.stop()
    sys.setswitchinterval(interval)


def add(hub: Hub, tmp_path: Path, keys: tuple[Path, Path], release: int, model: Callable[[Path], None]) -> str:
    version = f"1.{release}.0"
    directory = artifact(tmp_path, "gemm", model, ["batch", 32], ["batch", 30], keys[0], dirname=version,
                         version=version, release=release)  # fmt: skip
    admin(hub).add_artifact(directory)
    return version


def run_rollout(hub: Hub, version: str) -> dict[str, Any]:
    request = {"model": "gemm", "version": version, "target": "group:fleet", "strategy": "waves", "waves": WAVES,
               "gates": GATES, "wave_timeout_s": 60}  # on_failure: rollback (the default)  # fmt: skip
    started = dict(admin(hub).request("POST", "/v1/rollouts", json.dumps(request).encode()))
    assert [len(w["devices"]) for w in started["waves"]] == [4, 6, 10]
    ended: dict[str, Any] = {}

    def done() -> bool:
        ended.update(hub.rollouts.get(started["id"]))
        return ended["state"] in ("succeeded", "failed", "rolled-back", "aborted")

    # the rollout ends itself (a wave not judged within wave_timeout_s fails it): wait for that, 3 waves
    # of 60 s at most, rather than a shorter guess that a loaded machine outlasts (seen: a good version
    # still in wave 3 after 90 s with a 2-core VM at p95 86 ms for a 1 ms model)
    wait_until(f"rollout of {version} to end", done, 3 * request["wave_timeout_s"] + 30)
    verdicts = [(w["verdict"].get("why"), w["verdict"].get("new", {}).get("p95_ms"),
                 w["verdict"].get("previous", {}).get("p95_ms")) for w in ended["waves"]]  # fmt: skip
    print(f"{time.strftime('%H:%M:%S')} {version}: {ended['state']} ({ended['reason']}); {verdicts}")
    return ended


def everyone_on(hub: Hub, fleet: list[Device], version: str) -> bool:
    """Every agent runs ``version`` and the hub's registry shows each reporting it active."""
    return all(d.active_version("gemm") == version for d in fleet) and all(
        hub_reports(hub, d.device_id, "gemm") == (version, "active") for d in fleet
    )


def test_bad_versions_stop_at_the_canary_and_roll_back_a_good_one_reaches_everyone(
    hub: Hub, fleet: list[Device], tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    base = add(hub, tmp_path, keys, 1, NORMAL)
    admin(hub).deploy("gemm", base, "group:fleet")
    wait_until(f"{base} everywhere", lambda: everyone_on(hub, fleet, base), 90)
    print(f"{time.strftime('%H:%M:%S')} {base} on {DEVICES} agents")
    for device in fleet:
        device.start_app("gemm", RATE)

    bad = {}
    for release, model, why in ((2, partial(flaky_gemm_onnx, above=0.5), "error rate"), (3, SLOW, "p95 latency")):
        version = add(hub, tmp_path, keys, release, model)
        ended = run_rollout(hub, version)
        canary = set(ended["waves"][0]["devices"])
        assert ended["state"] == "rolled-back" and why in ended["reason"], ended["events"]
        assert ended["current_wave"] == 0 and [w["deployment_id"] is not None for w in ended["waves"]] == [
            True, False, False]  # fmt: skip
        assert f"4 devices sent back (4 to {base})" in ended["events"][-1]["event"]
        wait_until(f"the canary back on {base}", lambda: everyone_on(hub, fleet, base), 30)
        assert {d.device_id for d in fleet if version in installed_versions(d, "gemm")} == canary  # no one else
        bad[version] = ended

    good = add(hub, tmp_path, keys, 4, partial(NORMAL, seed=1))
    ended = run_rollout(hub, good)
    assert ended["state"] == "succeeded", ended["reason"]
    assert all(w["verdict"]["passed"] for w in ended["waves"])
    wait_until(f"{good} everywhere", lambda: everyone_on(hub, fleet, good), 30)

    # the hub's records and every device agree
    for rollout in [*bad.values(), ended]:
        record = hub.rollouts.get(rollout["id"])
        assert record["state"] == rollout["state"]
        for wave in record["waves"]:
            if wave["deployment_id"] is None:
                continue
            states = hub.deployment(wave["deployment_id"])["states"]
            assert sorted(states) == sorted(wave["devices"])
            if record["state"] == "succeeded":
                assert {s["state"] for s in states.values()} == {"active"}
    for device in fleet:
        reported = admin(hub).request("GET", f"/v1/devices/{device.device_id}")["reported"]
        assert [(m["name"], m["version"], m["state"]) for m in reported["models"]] == [("gemm", good, "active")]
        assert reported["error"] is None and reported["desired_counter"] == device.agent.guard.counter
        assert device.agent.store.active("gemm").version == good  # type: ignore[union-attr]

    # what the gates saw: the slow version about 3x the normal one's latency, as the SDK measured it
    slow = list(bad)[1]
    latency = latency_ms(hub.registry, "gemm")
    print(f"SDK-measured latency (ms): {base} {latency[base]}, {slow} {latency[slow]}, {good} {latency[good]}")
    assert latency[slow]["p50"] > 2 * latency[base]["p50"]
