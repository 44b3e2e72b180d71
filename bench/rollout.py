"""Rollouts at fleet scale: 1,000 simulated agents answering with telemetry, a real hub driving waves.

The hub is a real `cloud_hub.server.Hub` (registry, control plane signing desired states with its key,
rollout engine ticking every 0.25 s) on one Mosquitto; the devices are recorded as enrollment records
them (profile, group `fleet`). The agents are the fleet bench's (`bench/simagents.py`, 250 per process
from one select() loop) holding the hub's public key: each follows its signed desired state (signature,
device id, counter; a release below an installed one only when the signed state marks it `rollback`),
reports every change at once and sends a telemetry window every `interval` seconds for the version it
runs: a good version ~0.2 % errors and latencies log-normal around 2 ms; version 1.1.0 30 % errors;
version 1.2.0 3x the latency. The artifacts are small signed Gemm models (the simulation does not run
them; the telemetry says how each version behaves).

1. 1.0.0 to the whole fleet with a plain deploy (`deploy --to group:fleet`, all at once): the baseline.
2. 1.1.0 (errors), then 1.2.0 (slow) as rollouts in waves 5 %, 25 %, 100 % with health gates and the
   default `on_failure: rollback`: each must stop at the canary wave and be rolled back automatically.
3. 1.3.0 (good) the same way: it must pass every wave.

- `bad_exposed_fraction`: devices that ever ran a bad version (their own record) / all devices; the
  larger of the two bad versions (the canary is 5 %).
- `rollback_seconds`: from the engine's failure event to the hub's registry showing the last canary
  device reporting the previous version active (polled every 20 ms); the larger of the two.
- `good_rollout_seconds`: from `POST /v1/rollouts` of 1.3.0 to the rollout `succeeded` (every device
  reporting it active, every wave's gates passed); `vs_all_at_once` is its ratio to step 1's time.
- `state_exact`: at the end the hub's rollout records (both bad ones rolled back at wave 1, only the
  canary reached, each canary device sent back; the good one succeeded with every wave passed and every
  device active in its deployments) and every device's reported state (online, exactly what the
  simulated agent holds: 1.3.0 active, no error) agree, and the devices that ran a bad version are
  exactly its canary.

    python bench/rollout.py [--quick] [--agents N]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MosquittoProcess, artifact, drive, gemm_onnx
from simagents import PROFILE, Behaviour, SimAgent

from cloud_hub.api_client import AdminClient
from cloud_hub.desired_signing import HUB_KEY_DIR
from cloud_hub.registry import Registry
from cloud_hub.server import Hub, HubConfig, operator_token
from edge_agent.protocol.signing import TrustStore, generate_keypair

BASE, ERRORS, SLOW, GOOD = "1.0.0", "1.1.0", "1.2.0", "1.3.0"
BEHAVIOUR = {BASE: Behaviour(), ERRORS: Behaviour(error_rate=0.3), SLOW: Behaviour(latency_ms=6.0),
             GOOD: Behaviour()}  # fmt: skip
WAVES = ["5%", "25%", "100%"]


def worker(port: int, first: int, count: int, trust_dir: str, hub_key_dir: str, rate: float, interval: float) -> None:
    """Child process: ``count`` agents; prints 'ready'; on 'held' prints what each holds; exits on 'stop'."""
    trust, hub_keys = TrustStore.from_dir(Path(trust_dir)), TrustStore.from_dir(Path(hub_key_dir))
    agents = [SimAgent(f"fleet-{i:04d}", port, trust, hub_keys, BEHAVIOUR, rate, interval)
              for i in range(first, first + count)]  # fmt: skip
    clients = [a.client for a in agents]
    drive(clients, lambda: False, 1.0)  # CONNACK, SUBACK, the first reported state
    print("ready", flush=True)

    def step() -> bool:
        now = time.time()
        for agent in agents:
            agent.tick(now)
        if not select.select([sys.stdin], [], [], 0)[0]:
            return False
        if sys.stdin.readline().strip() == "held":
            print(json.dumps({a.device_id: a.held() for a in agents}), flush=True)
            return False
        return True  # 'stop' or the parent gone

    drive(clients, step, 24 * 3600)
    for client in clients:
        client.disconnect()


def reported_active(registry: Registry, device_id: str, version: str) -> bool:
    models = (registry.device(device_id)["reported"] or {}).get("models", [])
    return any(m["version"] == version and m["state"] == "active" for m in models)


def everyone_active(registry: Registry, version: str, agents: int) -> bool:
    active = 0
    for device in registry.devices():
        models = (device["reported"] or {}).get("models", [])
        active += any(m["version"] == version and m["state"] == "active" for m in models)
    return active == agents


def run_rollout(hub: Hub, admin: AdminClient, version: str, gates: dict[str, float],
                previous: str) -> dict[str, Any]:  # fmt: skip
    """Start a rollout of ``version`` and follow it to its end; for a failed one, also until every canary
    device reports ``previous`` active again. Returns the record with the figures measured."""
    request = {"model": "gemm", "version": version, "target": "group:fleet", "strategy": "waves", "waves": WAVES,
               "gates": gates, "wave_timeout_s": 120}  # fmt: skip
    start = time.monotonic()
    rollout = admin.request("POST", "/v1/rollouts", json.dumps(request).encode())
    deadline, back_at, ended = start + 300, None, None
    while time.monotonic() < deadline:
        rollout = hub.rollouts.get(rollout["id"])
        if rollout["state"] in ("succeeded", "failed", "aborted"):
            ended = time.monotonic()
            break
        if rollout["state"] == "rolled-back":
            ended = ended or time.monotonic()
            if all(reported_active(hub.registry, d, previous) for d in rollout["waves"][0]["devices"]):
                back_at = time.time()
                break
        time.sleep(0.02)
    failed = [e["at"] for e in rollout["events"] if "failed its health gates" in e["event"]]
    rollout["seconds"] = (ended or time.monotonic()) - start
    rollout["rollback_seconds"] = back_at - failed[0] if back_at is not None and failed else None
    wave = rollout["waves"][rollout["current_wave"]]
    print(f"{version}: {rollout['state']} at wave {rollout['current_wave'] + 1}/{len(rollout['waves'])} after "
          f"{rollout['seconds']:.2f} s ({wave['verdict'].get('why', '')})"
          + (f"; canary back on {previous} {rollout['rollback_seconds']:.2f} s after the gate failed"
             if rollout["rollback_seconds"] is not None else ""), flush=True)  # fmt: skip
    return dict(rollout)


def check_state(hub: Hub, held: dict[str, Any], bad: list[dict[str, Any]], good: dict[str, Any]) -> list[str]:
    """What disagrees between the hub's records and the devices (empty: exact)."""
    problems = []
    rows = {d["device_id"]: d for d in hub.registry.devices()}
    if set(rows) != set(held):
        problems.append(f"the hub knows {len(rows)} devices, the fleet has {len(held)}")
    for device_id, mine in held.items():
        row = rows.get(device_id, {})
        reported = row.get("reported") or {}
        if row.get("status") != "online" or reported.get("models") != [mine["model"]] or reported.get("error"):
            problems.append(f"{device_id}: the hub shows {reported.get('models')} ({row.get('status')}), "
                            f"the device holds {mine['model']}")  # fmt: skip
        elif mine["model"]["version"] != GOOD or mine["model"]["state"] != "active" or mine["error"]:
            problems.append(f"{device_id}: holds {mine['model']} ({mine['error']})")
    for rollout in bad:
        canary = set(rollout["waves"][0]["devices"])
        ran = {d for d, mine in held.items() if rollout["version"] in mine["ever_active"]}
        reached = [w["deployment_id"] is not None for w in rollout["waves"]]
        sent_back = f"{len(canary)} devices sent back ({len(canary)} to {BASE})"
        if rollout["state"] != "rolled-back" or reached != [True, False, False] or ran != canary or \
                sent_back not in rollout["events"][-1]["event"]:  # fmt: skip
            problems.append(
                f"{rollout['version']}: {rollout['state']}, waves reached {reached}, ran on {len(ran)} "
                f"devices ({len(ran - canary)} outside the canary); {rollout['events'][-1]['event']}"
            )
    if good["state"] != "succeeded" or not all(w["verdict"].get("passed") for w in good["waves"]):
        problems.append(f"{GOOD}: {good['state']} ({good['reason']})")
    for wave in good["waves"]:
        states = hub.deployment(wave["deployment_id"])["states"] if wave["deployment_id"] else {}
        if sorted(states) != sorted(wave["devices"]) or any(s["state"] != "active" for s in states.values()):
            problems.append(f"{GOOD}: deployment {wave['deployment_id']} is not active on all its devices")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 100 agents, short gates")
    parser.add_argument("--agents", type=int, default=1000, help="simulated agents (default 1000)")
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        port, first, count, trust_dir, hub_key_dir, rate, interval = args.worker
        return worker(int(port), int(first), int(count), trust_dir, hub_key_dir, float(rate), float(interval))
    if args.quick:
        agents, processes, rate, interval = 100, 2, 20.0, 1.0
        gates = {"min_calls": 200, "min_soak_s": 1.0}
    else:
        agents, processes, rate, interval = args.agents, 4, 10.0, 2.0
        gates = {"min_calls": 1000, "min_soak_s": 3.0}
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="edgefed-bench-rollout-"))
    broker = MosquittoProcess(work)
    hub, children = None, []
    try:
        key, pub = generate_keypair(work / "keys")
        state = work / "hub"
        (state / "trust").mkdir(parents=True)
        shutil.copy(pub, state / "trust")
        hub = Hub(HubConfig(state, broker=broker.url, grpc_port=0, admin_port=0, serving_profile=PROFILE,
                            rollout_tick_s=0.25))  # fmt: skip
        hub.start()
        assert hub.admin is not None
        admin = AdminClient(f"http://127.0.0.1:{hub.admin.port}", operator_token(state))
        for release, version in enumerate((BASE, ERRORS, SLOW, GOOD), start=1):
            model = partial(gemm_onnx, seed=release)  # a different model each version (the sim does not run it)
            directory = artifact(work, "gemm", model, ["batch", 32], ["batch", 30], key, dirname=version,
                                 version=version, release=release)  # fmt: skip
            admin.add_artifact(directory)
        for i in range(agents):  # what enrollment records for each device
            hub.registry.upsert_device(f"fleet-{i:04d}", profile=PROFILE, groups=["fleet"], enrolled=time.time())

        per = -(-agents // processes)
        for first in range(0, agents, per):
            command = [sys.executable, __file__, "--worker", str(broker.port), str(first),
                       str(min(per, agents - first)), str(pub.parent), str(state / HUB_KEY_DIR), str(rate),
                       str(interval)]  # fmt: skip
            children.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready", "a worker failed"
        connected = time.monotonic() + 60
        while sum(d["status"] == "online" for d in hub.registry.devices()) < agents and time.monotonic() < connected:
            time.sleep(0.1)
        print(f"{agents} agents online; {BASE} to group:fleet all at once", flush=True)

        start = time.monotonic()
        admin.deploy("gemm", BASE, "group:fleet")
        while not everyone_active(hub.registry, BASE, agents) and time.monotonic() < start + 300:
            time.sleep(0.05)
        all_at_once_s = time.monotonic() - start
        print(f"{BASE} active on {agents} agents in {all_at_once_s:.2f} s", flush=True)
        time.sleep(2 * interval)  # some telemetry of it

        bad = [run_rollout(hub, admin, version, gates, BASE) for version in (ERRORS, SLOW)]
        good = run_rollout(hub, admin, GOOD, gates, BASE)

        held: dict[str, Any] = {}
        for child in children:
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write("held\n")
            child.stdin.flush()
            held |= json.loads(child.stdout.readline())
        problems = check_state(hub, held, bad, good)
        for problem in problems[:10]:
            print(f"not exact: {problem}", flush=True)
        exposed = max(sum(r["version"] in h["ever_active"] for h in held.values()) for r in bad) / agents
        rollback_s = [r["rollback_seconds"] for r in bad]
        results = {
            "bench": "rollout", "quick": args.quick, "agents": agents, "canary_fraction": float(WAVES[0][:-1]) / 100,
            "bad_exposed_fraction": round(exposed, 4),
            "rollback_seconds": round(max(rollback_s), 2) if None not in rollback_s else None,
            "rollback_seconds_each": [round(s, 2) if s is not None else None for s in rollback_s],
            "bad_stopped_seconds": [round(r["seconds"], 2) for r in bad],
            "good_rollout_seconds": round(good["seconds"], 2), "all_at_once_seconds": round(all_at_once_s, 2),
            "vs_all_at_once": round(good["seconds"] / all_at_once_s, 2), "state_exact": not problems,
            "gates": gates, "calls_per_s_per_device": rate, "telemetry_interval_s": interval,
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
        }  # fmt: skip
    finally:
        for child in children:
            if child.poll() is None:
                assert child.stdin is not None
                try:
                    child.stdin.write("stop\n")
                    child.stdin.flush()
                except BrokenPipeError:
                    pass
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
        if hub is not None:
            hub.stop()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
