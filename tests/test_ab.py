"""A/B tests (issue 13) on real parts: a hub on Mosquitto, real agents installing B beside A, apps calling
the SDK with and without request keys, the split measured in the telemetry the hub received."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from common import artifact, gemm_onnx
from rollout_fleet import Device, wait_until
from test_hub_restarts import admin
from typer.testing import CliRunner

from cloud_hub.cli import app
from cloud_hub.desired_signing import HUB_KEY_DIR, HUB_KEY_NAME
from cloud_hub.server import TOKEN_FILE, Hub
from edge_agent import EdgeClient
from edge_agent.ab import BUCKETS, AbSpec, Split, bucket, read_ab

CALLS = 10_200  # over the three devices; at least 10,000 reach the hub's figures before the check
SPLIT = 30.0


@pytest.fixture
def fleet(hub: Hub, tmp_path: Path, keys: tuple[Path, Path]) -> Iterator[list[Device]]:
    devices = []
    hub_key = (hub.config.state_dir / HUB_KEY_DIR / f"{HUB_KEY_NAME}.pub").read_bytes()
    for i in range(3):
        hub.registry.upsert_device(f"dev-{i}", profile="x86-64-generic", groups=["fleet"])
        devices.append(Device(tmp_path / "fleet", f"dev-{i}", hub.broker_url, keys, "fleet", hub_key))
    yield devices
    for device in devices:
        device.stop()


def add(hub: Hub, tmp_path: Path, keys: tuple[Path, Path], version: str, release: int, seed: int = 0,
        classes: int = 30) -> None:  # fmt: skip
    directory = artifact(tmp_path, "gemm", partial(gemm_onnx, seed=seed, classes=classes), ["batch", 32],
                         ["batch", classes], keys[0], reference=True, dirname=version, version=version,
                         release=release)  # fmt: skip
    admin(hub).add_artifact(directory)


def cli(hub: Hub, *args: str) -> Any:
    """``cloud-hub ARGS --json`` against the running hub's admin API; the parsed JSON it printed."""
    assert hub.admin is not None
    token = (hub.config.state_dir / TOKEN_FILE).read_text().strip()
    result = CliRunner().invoke(app, [*args, "--hub", f"http://127.0.0.1:{hub.admin.port}", "--token", token,
                                      "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def ab_on(fleet: list[Device], test_id: str | None) -> bool:
    """Every device has the test (None: no test) in its store and in what it reports."""
    for device in fleet:
        spec = read_ab(device.agent.store, "gemm")
        reported = device.agent.ab.reported.get("gemm")
        if test_id is None and (spec is not None or reported is not None):
            return False
        if test_id is not None and (spec is None or spec.ab_id != test_id or reported is None
                                    or reported.state != "active"):  # fmt: skip
            return False
    return True


def call(fleet: list[Device], calls: int) -> dict[str, set[str]]:
    """``calls`` calls over the devices' apps, every other one with a request key (850 users, each on every
    device); the versions each key got."""
    seen: dict[str, set[str]] = {}
    rng = np.random.default_rng(0)
    per_device = calls // len(fleet)
    for device in fleet:
        with EdgeClient(device.state, cloud=False) as client:
            for i in range(per_device):
                x = {"input": rng.standard_normal((1, 32)).astype(np.float32)}
                if i % 2:
                    key = f"user-{i // 2 % 850}"  # 850 users, each twice on every device
                    seen.setdefault(key, set()).add(client.infer("gemm", x, key=key).version)
                else:
                    client.infer("gemm", x)
    return seen


def test_a_b_split_on_real_agents_is_within_3_points_sticky_and_ends_by_stop_or_promote(
    hub: Hub, fleet: list[Device], tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    add(hub, tmp_path, keys, "1.1.0", 1)
    add(hub, tmp_path, keys, "1.2.0", 2, seed=1)
    admin(hub).deploy("gemm", "1.1.0", "group:fleet")
    wait_until("1.1.0 everywhere", lambda: all(d.active_version("gemm") == "1.1.0" for d in fleet))

    test = cli(hub, "ab", "start", "gemm", "--a", "1.1.0", "--b", "1.2.0", "--split", str(SPLIT), "--to",
               "group:fleet")  # fmt: skip
    assert test["state"] == "running" and set(test["devices"]) == {d.device_id for d in fleet}
    wait_until("B installed beside A on every device", lambda: ab_on(fleet, test["id"]), 60)
    assert all(d.active_version("gemm") == "1.1.0" for d in fleet)  # A stays the active pointer
    reported = admin(hub).request("GET", "/v1/devices/dev-0")["reported"]
    wait_until("the hub to see B", lambda: admin(hub).request("GET", "/v1/devices/dev-0")["reported"]["models"][0]
               .get("ab", {}) or {})  # fmt: skip
    reported = admin(hub).request("GET", "/v1/devices/dev-0")["reported"]["models"][0]
    assert reported["version"] == "1.1.0" and reported["ab"]["version"] == "1.2.0"

    seen = call(fleet, CALLS)
    assert all(len(versions) == 1 for versions in seen.values()), seen  # sticky: one version per key ...
    assert {v for versions in seen.values() for v in versions} == {"1.1.0", "1.2.0"}  # ... on every device

    def status() -> dict[str, Any]:
        return dict(cli(hub, "ab", "status", test["id"]))

    wait_until("the calls' telemetry at the hub", lambda: status()["observed_split"]["calls"] >= 10_000, 60)
    figures = status()
    observed = figures["observed_split"]
    print(f"A/B split over {observed['calls']} calls: {observed['value'] * 100:.2f}% to B "
          f"(configured {SPLIT:g}%), 95% CI {observed['ci95']}")  # fmt: skip
    assert abs(observed["value"] * 100 - SPLIT) <= 3.0
    for side, version in (("a", "1.1.0"), ("b", "1.2.0")):
        shown = figures["figures"][side]
        assert shown["version"] == version and shown["calls"] > 0
        assert shown["error_rate"]["value"] == 0.0 and shown["error_rate"]["ci95"][1] > 0
        assert shown["fallback_rate"]["value"] == 0.0
        assert shown["p50_ms"]["value"] > 0 and shown["p95_ms"]["ci95"][0] <= shown["p95_ms"]["value"]
        assert sum(shown["outputs"]["output/class"]["counts"]) > 0
    assert figures["figures"]["a"]["calls"] + figures["figures"]["b"]["calls"] == observed["calls"]
    assert 0.0 <= figures["comparison"]["outputs"]["output/class"]["p_value"] <= 1.0
    assert figures["verdict"]

    stopped = cli(hub, "ab", "stop", test["id"])
    assert stopped["state"] == "stopped"
    wait_until("the split gone everywhere", lambda: ab_on(fleet, None), 30)
    assert all(d.active_version("gemm") == "1.1.0" for d in fleet)
    with EdgeClient(fleet[0].state, cloud=False) as client:
        x = {"input": np.zeros((1, 32), np.float32)}
        assert {client.infer("gemm", x, key=f"user-{i}").version for i in range(50)} == {"1.1.0"}

    again = cli(hub, "ab", "start", "gemm", "--a", "1.1.0", "--b", "1.2.0", "--to", "group:fleet")
    wait_until("the second test on every device", lambda: ab_on(fleet, again["id"]), 60)
    assert cli(hub, "ab", "promote", again["id"])["state"] == "promoted"
    wait_until("B promoted everywhere", lambda: ab_on(fleet, None) and all(
        d.active_version("gemm") == "1.2.0" for d in fleet), 60)  # fmt: skip
    listed = {t["id"]: t["state"] for t in cli(hub, "ab", "list")}
    assert listed == {test["id"]: "stopped", again["id"]: "promoted"}


def test_an_a_b_test_of_versions_with_different_interfaces_is_refused(hub: Hub, tmp_path: Path,
                                                                      keys: tuple[Path, Path]) -> None:  # fmt: skip
    hub.registry.upsert_device("dev-0", profile="x86-64-generic", groups=["fleet"])
    add(hub, tmp_path, keys, "1.1.0", 1)
    add(hub, tmp_path, keys, "2.0.0", 2, classes=10)  # a new major version may change the interface
    refused = r"A/B test refused: gemm@1.1.0 and gemm@2.0.0 have different interfaces \(output 'output': "
    with pytest.raises(Exception, match=refused + r"float32 \['batch', 30\] -> float32 \['batch', 10\]\)"):
        body = {"model": "gemm", "a": "1.1.0", "b": "2.0.0", "split": 50, "target": "group:fleet"}
        admin(hub).request("POST", "/v1/ab", json.dumps(body).encode())
    assert admin(hub).request("GET", "/v1/ab") == []


def test_keys_hash_to_stable_buckets_and_random_calls_follow_the_split() -> None:
    assert bucket("user-1", "t1") == bucket("user-1", "t1") == bucket(b"user-1", "t1")
    assert bucket(42, "t1") == bucket("42", "t1")
    shares = Counter(bucket(f"user-{i}", "t1") < 2_500 for i in range(20_000))
    assert abs(shares[True] / 20_000 - 0.25) < 0.015  # the buckets are uniform
    buckets = [bucket(f"u{i}", "t2") for i in range(1000)]
    assert min(buckets) >= 0 and max(buckets) < BUCKETS
    a, b = object(), object()
    split = Split(AbSpec("t3", "1", "2", "x", 20.0), b)  # type: ignore[arg-type]
    picked = Counter(split.pick(a, None) is b for _ in range(20_000))  # type: ignore[arg-type]
    assert abs(picked[True] / 20_000 - 0.20) < 0.015
    assert {split.pick(a, "same-user") is b for _ in range(100)} in ({True}, {False})  # type: ignore[arg-type]
