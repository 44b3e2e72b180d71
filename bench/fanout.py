"""Artifact fan-out over MQTT: one hub, one Mosquitto, many simulated agents in several processes.

1. Fan-out: every agent subscribes to the artifact's chunk topic and asks for all chunks at the same
   moment; the hub gathers the requests for `fetch_window_s` and publishes each chunk once; every agent
   checks every chunk's sha256 against the signed manifest → `seconds` (target ≤ 15 s for 20 MB to
   200 agents) and `hub_egress_ratio` (bytes the hub published / artifact size, ≤ 1.1).
2. Unicast baseline, same run: the artifact published to each agent on a topic of its own (what a
   per-device download does); measured on up to 50 agents and scaled linearly to all →
   `speedup_vs_unicast` (≥ 2).
3. Loss: the agents drop the same 10 % of the chunks on first delivery (loss on the shared path) and
   ask again for what they miss → `resume_retransfer_fraction` (re-sent bytes / artifact size, ≤ 0.12).

Simulated agents are paho clients driven by one select() loop per process (not full agents: no
store, no runtime), so the figures are the transfer's.
    python bench/fanout.py [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MosquittoProcess, drive, sized_artifact

from cloud_hub.artifacts import ArtifactStore
from cloud_hub.control import ControlPlane
from cloud_hub.registry import SQLiteRegistry
from edge_agent.protocol.artifact import read_manifest
from edge_agent.protocol.manifest import manifest_from_wire
from edge_agent.protocol.messages import Chunk, FetchRequest, to_wire
from edge_agent.protocol.signing import TrustStore, generate_keypair
from edge_agent.protocol.topics import Topics

CHUNK = 256 * 1024
TOPICS = Topics()


def dropped(key: tuple[int, int], fraction: float, agent: str = "") -> bool:
    """About ``fraction`` of the chunks are lost: the same ones for every agent (loss on the shared
    path), or with ``agent`` different ones for each (independent loss on each device's link)."""
    digest = hashlib.sha256(f"{agent}{key[0]}/{key[1]}".encode()).digest()
    return digest[0] < 256 * fraction


class SimAgent:
    def __init__(self, name: str, port: int, manifest: Any, topic: str, drop: float, independent: bool) -> None:
        self.name, self.manifest, self.topic, self.drop = name, manifest, topic, drop
        self.salt = name if independent else ""
        self.received = 0
        self.expected = {(f, c): h for f, e in enumerate(manifest.files) for c, h in enumerate(e.chunks)}
        self.have: set[tuple[int, int]] = set()
        self.lost_once: set[tuple[int, int]] = set()
        self.done_at = 0.0
        self.last_chunk = time.monotonic()
        self.bad = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311)
        self.client.max_inflight_messages_set(100)
        self.client.on_message = self.on_message
        self.client.connect("127.0.0.1", port, keepalive=60)

    def on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        chunk = Chunk.from_wire(message.payload)
        key = (chunk.file_index, chunk.chunk_index)
        self.last_chunk = time.monotonic()
        self.received += 1
        if key in self.have:
            return
        if self.drop and key not in self.lost_once and dropped(key, self.drop, self.salt):
            self.lost_once.add(key)
            return
        if hashlib.sha256(chunk.data).hexdigest() != self.expected.get(key):
            self.bad += 1
            return
        self.have.add(key)
        if len(self.have) == len(self.expected):
            self.done_at = time.monotonic()
            self.client.unsubscribe(self.topic)  # as the agent does once it holds the artifact

    def ask(self, missing_only: bool) -> None:
        missing = sorted(set(self.expected) - self.have) if missing_only else []
        request = FetchRequest(self.manifest.artifact_id, tuple(missing))
        self.client.publish(TOPICS.fetch(self.name), to_wire(request), qos=1)


def worker(port: int, first: int, count: int, manifest_path: str, mode: str, drop: float) -> None:
    """Child process: ``count`` simulated agents; waits for 'go' on stdin; prints one JSON line."""
    manifest = manifest_from_wire(json.loads(Path(manifest_path).read_text()))
    names = [f"sim-{i:04d}" for i in range(first, first + count)]
    fanout = mode.startswith("fanout")
    topics = [TOPICS.chunks(manifest.artifact_id) if fanout else TOPICS.device(n, "unicast") for n in names]
    independent = mode == "fanout-independent"
    agents = [SimAgent(n, port, manifest, t, drop, independent) for n, t in zip(names, topics, strict=True)]
    for agent in agents:
        agent.client.subscribe(agent.topic, qos=1)
        if fanout:  # the agent's own chunk topic: what only a few devices lack comes there
            agent.client.subscribe(TOPICS.device_chunks(agent.name), qos=1)
    drive([a.client for a in agents], lambda: False, 0.5)  # CONNACK and SUBACK
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.monotonic()
    if fanout:
        for agent in agents:
            agent.ask(missing_only=False)
    asks = 0

    def finished() -> bool:
        nonlocal asks
        now = time.monotonic()
        for agent in agents:  # a quiet agent still missing chunks asks for exactly those again
            if not agent.done_at and fanout and now - agent.last_chunk > 1.0:
                agent.ask(missing_only=True)
                agent.last_chunk = now
                asks += 1
        return all(a.done_at for a in agents)

    drive([a.client for a in agents], finished, 120)
    done = [a for a in agents if a.done_at]
    print(json.dumps({"agents": count, "complete": len(done), "bad_chunks": sum(a.bad for a in agents),
                      "last_s": max((a.done_at - start for a in done), default=-1), "re_asks": asks,
                      "received": sum(a.received for a in agents)}))  # fmt: skip


def run_round(port: int, agents: int, processes: int, manifest_path: Path, mode: str, drop: float,
              publish: Any = None) -> dict[str, Any]:  # fmt: skip
    per = -(-agents // processes)
    children = []
    for p in range(processes):
        count = min(per, agents - p * per)
        if count <= 0:
            break
        command = [sys.executable, __file__, "--worker", str(port), str(p * per), str(count), str(manifest_path), mode,
                   str(drop)]  # fmt: skip
        children.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    for child in children:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    start = time.monotonic()
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    if publish is not None:
        publish()
    results = [json.loads(child.communicate(timeout=300)[0].strip().splitlines()[-1]) for child in children]
    wall = time.monotonic() - start
    complete = sum(r["complete"] for r in results)
    return {"seconds": round(max(max(r["last_s"] for r in results), 0.0) if complete == agents else wall, 3),
            "complete": complete, "bad_chunks": sum(r["bad_chunks"] for r in results),
            "re_asks": sum(r["re_asks"] for r in results), "received": sum(r["received"] for r in results)}  # fmt: skip


def unicast_publisher(port: int, store: ArtifactStore, manifest: Any, devices: list[str]) -> Any:
    def publish() -> None:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="unicast-hub", protocol=mqtt.MQTTv311)
        client.max_inflight_messages_set(100)
        client.connect("127.0.0.1", port)
        client.loop_start()
        for device in devices:  # one copy per device, as a per-device download sends it
            info = None
            for f, entry in enumerate(manifest.files):
                for c in range(len(entry.chunks)):
                    data = store.read_chunk(manifest, f, c)
                    info = client.publish(TOPICS.device(device, "unicast"), Chunk(f, c, data).to_wire(), qos=1)
            assert info is not None
            info.wait_for_publish(timeout=120)
        client.disconnect()
        client.loop_stop()

    return publish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 MB to 20 agents")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        port, first, count, path, mode, drop = args.worker
        return worker(int(port), int(first), int(count), path, mode, float(drop))
    size_mb, agents, processes = (2, 20, 2) if args.quick else (20, 200, 4)
    work = Path(tempfile.mkdtemp(prefix="edgefed-bench-fanout-"))
    broker = MosquittoProcess(work)
    control = None
    try:
        key, pub = generate_keypair(work / "keys")
        directory = sized_artifact(work, "big", size_mb * 1024 * 1024, key, CHUNK)
        manifest = read_manifest(directory, TrustStore.from_dir(pub.parent))
        registry = SQLiteRegistry(str(work / "registry.db"))
        store = ArtifactStore(work / "artifacts", TrustStore.from_dir(pub.parent))
        store.add(directory)
        registry.add_artifact(manifest, store.signature(manifest.artifact_id))
        manifest_path = work / "manifest.json"
        manifest_path.write_text(json.dumps(manifest.to_wire()))
        control = ControlPlane(broker.url, registry, store, TOPICS, fetch_window_s=0.3)
        control.start()
        total = manifest.total_size

        fan = run_round(broker.port, agents, processes, manifest_path, "fanout", 0.0)
        egress = control.bytes_sent / total
        print(f"fan-out: {size_mb} MB to {fan['complete']}/{agents} agents in {fan['seconds']:.2f} s, "
              f"hub egress {egress:.3f}x the artifact, bad chunks {fan['bad_chunks']}")  # fmt: skip

        sent_before = control.bytes_sent
        lossy = run_round(broker.port, agents, processes, manifest_path, "fanout", 0.10)
        retransfer = (control.bytes_sent - sent_before - total) / total
        print(f"10 % loss: complete {lossy['complete']}/{agents} in {lossy['seconds']:.2f} s, re-sent "
              f"{retransfer:.3f}x the artifact after {lossy['re_asks']} re-asks")  # fmt: skip

        def independent_loss(shared_above: float) -> tuple[dict[str, Any], float, float]:
            """(round, hub re-sent / artifact, extra chunks each device received / chunks in the artifact)."""
            control.shared_above = shared_above
            sent_before = control.bytes_sent
            outcome = run_round(broker.port, agents, processes, manifest_path, "fanout-independent", 0.10)
            device_extra = outcome["received"] / agents / manifest.chunk_count - 1
            return outcome, (control.bytes_sent - sent_before - total) / total, device_extra

        assert control is not None
        own, own_hub, own_device = independent_loss(0.5)  # the hub's default
        shared, shared_hub, shared_device = independent_loss(0.0)  # every chunk on the shared topic: the union
        print(f"10 % independent loss: each device received {own_device:.3f}x the artifact extra with "
              f"per-device re-sends vs {shared_device:.3f}x with shared re-sends ({shared_device / own_device:.1f}x "
              f"less); the hub re-sent {own_hub:.2f}x vs {shared_hub:.2f}x the artifact")  # fmt: skip

        measured = min(agents, 10 if args.quick else 50)
        devices = [f"sim-{i:04d}" for i in range(measured)]
        uni = run_round(broker.port, measured, max(1, processes // 2), manifest_path, "unicast", 0.0,
                        unicast_publisher(broker.port, store, manifest, devices))  # fmt: skip
        unicast_all = uni["seconds"] * agents / measured
        print(f"unicast: {measured} agents in {uni['seconds']:.2f} s -> {unicast_all:.1f} s for {agents} "
              f"(scaled); fan-out is {unicast_all / fan['seconds']:.1f}x faster")  # fmt: skip
        results = {
            "bench": "fanout", "quick": args.quick, "artifact_mb": size_mb, "agents": agents,
            "seconds": fan["seconds"], "fanout_complete": fan["complete"], "bad_chunks": fan["bad_chunks"],
            "hub_egress_ratio": round(egress, 3), "resume_retransfer_fraction": round(retransfer, 3),
            "lossy_complete": lossy["complete"], "unicast_measured_agents": measured,
            "unicast_measured_s": uni["seconds"], "unicast_scaled_s": round(unicast_all, 2),
            "speedup_vs_unicast": round(unicast_all / fan["seconds"], 2),
            "independent_loss_complete": min(own["complete"], shared["complete"]),
            "independent_loss_s": own["seconds"], "independent_loss_s_shared_only": shared["seconds"],
            "independent_loss_device_extra": round(own_device, 3),
            "independent_loss_device_extra_shared_only": round(shared_device, 3),
            "independent_loss_device_saving": round(shared_device / own_device, 2),
            "independent_loss_hub_resent": round(own_hub, 3), "independent_loss_hub_resent_shared_only": round(
                shared_hub, 3),
        }  # fmt: skip
    finally:
        if control is not None:
            control.stop()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
