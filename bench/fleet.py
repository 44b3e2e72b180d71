"""Fleet deployment: 1,000 simulated agents on one Mosquitto, a 1 MB model deployed to all of them.

The hub is the real `ControlPlane` on a SQLite registry, with the devices recorded as enrollment
records them (profile, group `fleet`). Each simulated agent (`bench/simagents.py`) speaks the agent's
protocol on its own topics: a persistent session, a retained `online` status with an `offline` Last
Will, a retained reported state; on the desired state it checks the manifest's signature against the
trusted key, reports `downloading`, asks for the chunks, checks each chunk's and each file's sha256, and
reports the model `active`. One select() loop per process drives 250 of them (no store, no runtime: the
figures are the control plane's and the transfer's).

- `deploy_seconds`: from `deploy --to group:fleet` until the hub's registry shows every device
  reporting the new artifact active (target ≤ 60 s for 1,000 agents and 1 MB).
- `state_exact`: then, for every device, the hub's recorded status and reported model equal what the
  simulated agent holds, the deployment's per-device state is `active`, and no other device is known.

    python bench/fleet.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MosquittoProcess, drive, sized_artifact
from simagents import PROFILE, TOPICS, SimAgent

from cloud_hub.artifacts import ArtifactStore
from cloud_hub.control import ControlPlane
from cloud_hub.registry import SQLiteRegistry
from edge_agent.protocol.artifact import read_manifest
from edge_agent.protocol.signing import TrustStore, generate_keypair

CHUNK = 256 * 1024


def worker(port: int, first: int, count: int, trust_dir: str) -> None:
    """Child process: ``count`` agents; prints 'ready', then 'done' with what each holds; exits on 'stop'."""
    trust = TrustStore.from_dir(Path(trust_dir))
    agents = [SimAgent(f"fleet-{i:04d}", port, trust) for i in range(first, first + count)]
    clients = [a.client for a in agents]
    drive(clients, lambda: False, 1.0)  # CONNACK, SUBACK, the first reported state
    print("ready", flush=True)

    def active() -> bool:
        now = time.monotonic()
        for agent in agents:
            if agent.stalled(now):
                agent.ask()
        return all(a.model is not None and a.model.state == "active" for a in agents)

    drive(clients, active, 300)
    held = {a.device_id: dataclasses.asdict(a.model) if a.model else None for a in agents}
    print(json.dumps(held), flush=True)
    drive(clients, lambda: bool(select.select([sys.stdin], [], [], 0)[0]), 300)  # online until the parent checked
    for client in clients:
        client.disconnect()


def hub_view_matches(registry: SQLiteRegistry, deployment: dict[str, Any], held: dict[str, Any]) -> bool:
    """Every device and only those: online, and reporting exactly what it holds; deployment state active."""
    rows = {d["device_id"]: d for d in registry.devices()}
    if set(rows) != set(held):
        return False
    for device_id, model in held.items():
        row = rows[device_id]
        reported = (row["reported"] or {}).get("models", [])
        if row["status"] != "online" or reported != [model] or model["state"] != "active":
            return False
        if model["artifact_id"] != deployment["devices"][device_id]:
            return False
    return True


def everyone_active(registry: SQLiteRegistry, artifact_id: str, agents: int) -> bool:
    """The hub's view: ``agents`` devices report ``artifact_id`` active."""
    active = 0
    for device in registry.devices():
        models = (device["reported"] or {}).get("models", [])
        active += any(m["artifact_id"] == artifact_id and m["state"] == "active" for m in models)
    return active == agents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 256 KiB to 40 agents")
    parser.add_argument("--agents", type=int, default=1000, help="simulated agents (default 1000)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        port, first, count, trust_dir = args.worker
        return worker(int(port), int(first), int(count), trust_dir)
    agents, size, processes = (40, 256 * 1024, 2) if args.quick else (args.agents, 1024 * 1024, 4)
    work = Path(tempfile.mkdtemp(prefix="edgefed-bench-fleet-"))
    broker = MosquittoProcess(work)
    control, children = None, []
    try:
        key, pub = generate_keypair(work / "keys")
        directory = sized_artifact(work, "fleet-model", size, key, CHUNK)
        manifest = read_manifest(directory, TrustStore.from_dir(pub.parent))
        registry = SQLiteRegistry(str(work / "registry.db"))
        store = ArtifactStore(work / "artifacts", TrustStore.from_dir(pub.parent))
        store.add(directory)
        registry.add_artifact(manifest, store.signature(manifest.artifact_id))
        for i in range(agents):  # what enrollment records for each device
            registry.upsert_device(f"fleet-{i:04d}", profile=PROFILE, groups=["fleet"], enrolled=time.time())
        control = ControlPlane(broker.url, registry, store, TOPICS, fetch_window_s=0.3)
        control.start()

        per = -(-agents // processes)
        for first in range(0, agents, per):
            command = [sys.executable, __file__, "--worker", str(broker.port), str(first),
                       str(min(per, agents - first)), str(pub.parent)]  # fmt: skip
            children.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready", "a worker failed"
        connected = time.monotonic() + 60
        while sum(d["status"] == "online" for d in registry.devices()) < agents and time.monotonic() < connected:
            time.sleep(0.1)
        print(f"{agents} agents online; deploying {manifest.total_size / 1e6:.2f} MB to group:fleet")

        start = time.monotonic()
        deployment = control.deploy("fleet-model", "1.0.0", "group:fleet")
        published_s = time.monotonic() - start
        deadline = start + 300
        while not everyone_active(registry, manifest.artifact_id, agents) and time.monotonic() < deadline:
            time.sleep(0.05)
        deploy_seconds = time.monotonic() - start
        held: dict[str, Any] = {}
        for child in children:
            assert child.stdout is not None
            held |= json.loads(child.stdout.readline())
        exact = hub_view_matches(registry, deployment, held)
        print(f"deployed to {agents} agents in {deploy_seconds:.2f} s (desired state published in "
              f"{published_s:.2f} s); hub egress {control.bytes_sent / manifest.total_size:.2f}x the artifact; "
              f"hub's view exact: {exact}")  # fmt: skip
        results = {
            "bench": "fleet", "quick": args.quick, "agents": agents, "artifact_mb": round(size / 2**20, 2),
            "deploy_seconds": round(deploy_seconds, 2), "desired_published_s": round(published_s, 2),
            "hub_egress_ratio": round(control.bytes_sent / manifest.total_size, 2), "state_exact": exact,
        }  # fmt: skip
    finally:
        for child in children:
            if child.poll() is None:
                assert child.stdin is not None
                child.stdin.write("stop\n")
                child.stdin.flush()
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
        if control is not None:
            control.stop()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
