"""Telemetry throughput (issue 12): records/s the spool's batching delivers to the hub vs one record per
QoS 1 message, through the same Mosquitto and the same hub process, interleaved and repeated.

* **batched**: a real spool (``edge_agent.spool.Spool``) filled with blocks of ``BLOCK`` calls (what an
  app's writer thread spools every 0.25 s at 1,000 calls/s), drained the way the agent drains it:
  ``next_batch`` (``BATCH_ROWS`` rows = 5,000 calls, the agent's 5 s interval at that rate), publish at
  QoS 1, wait for the hub's ``TelemetryAck``, ``acknowledge``; one batch in flight, as the agent does,
  but back to back instead of one per interval.
* **per record**: the same calls, each its own ``TelemetryBatch`` of one window of one call (its own
  seq), published at QoS 1 with up to 100 in flight (pipelined: the baseline's best case), until the
  hub has acknowledged every one.

``records_per_s`` = calls / seconds from the first publish to the last acknowledgement; ``lost`` = calls
sent - calls the hub stored (`GET /v1/telemetry`, summed over every phase); ``hub_cpu_cores`` = the hub
process's CPU seconds (psutil, all its threads) / wall seconds during the batched phases (the highest),
``hub_cpu_cores_per_record`` the same for the per-record phases. Ratios are per repeat (adjacent
phases); the JSON gives their median, min and max.

    python bench/telemetry.py [--quick] [--repeats N] [--calls N] [--single-calls N]

Ends with one JSON line: ``records_per_s_ratio``, ``lost``, ``hub_cpu_cores``, ``quick`` and more.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import psutil  # type: ignore[import-untyped]
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import HubProcess, MosquittoProcess

from edge_agent.calls import CallBlock, aggregate
from edge_agent.protocol.messages import TelemetryAck, TelemetryBatch, from_wire, to_wire
from edge_agent.protocol.signing import generate_keypair
from edge_agent.protocol.topics import DEFAULT_ROOT, Topics
from edge_agent.spool import Spool

BLOCK = 250  # calls per spool row
BATCH_ROWS = 20  # rows per batch: 5,000 calls
IN_FLIGHT = 100
ACK_TIMEOUT_S = 60.0


class Sender:
    """A device's MQTT link (paho, its own network thread): publishes on the device's telemetry topic and
    collects the hub's acknowledgements."""

    def __init__(self, broker_port: int, device: str) -> None:
        self.topics, self.device = Topics(DEFAULT_ROOT), device
        self.acked: set[tuple[str, int]] = set()
        self.changed = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{device}", protocol=mqtt.MQTTv311)
        self.client.max_inflight_messages_set(IN_FLIGHT)
        self.client.max_queued_messages_set(0)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker_port)
        self.client.subscribe(self.topics.telemetry_ack(device), qos=1)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        ack = from_wire(TelemetryAck, bytes(message.payload))
        with self.changed:
            self.acked.add((ack.epoch, ack.seq))
            self.changed.notify_all()

    def publish(self, batch: TelemetryBatch) -> None:
        self.client.publish(self.topics.telemetry(self.device), to_wire(batch), qos=1)

    def wait(self, keys: set[tuple[str, int]]) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: keys <= self.acked, timeout=ACK_TIMEOUT_S):
                raise RuntimeError(f"{len(keys - self.acked)} batches not acknowledged in {ACK_TIMEOUT_S:.0f} s")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def calls(n: int, t0: float) -> list[CallBlock]:
    rng = np.random.default_rng(int(t0))
    latency = rng.gamma(2.0, 0.5, n).astype(np.float32)
    ts = t0 + np.arange(n, dtype=np.float64) * 1e-3
    ok = np.ones(n, np.uint8)
    return [CallBlock("gemm", "1.0.0", "local", ts[i : i + BLOCK], latency[i : i + BLOCK], ok[i : i + BLOCK])
            for i in range(0, n, BLOCK)]  # fmt: skip


def filled_spool(work: Path, device: str, n: int) -> Spool:
    spool = Spool(work / f"{device}.db", max_calls=10 * n)
    for start in range(0, n, 50 * BLOCK):
        spool.append(calls(min(50 * BLOCK, n - start), 1.8e9 + start))
    return spool


def batched(sender: Sender, spool: Spool) -> float:
    """Drain the spool as the agent does; the seconds from first publish to last ack."""
    began = time.perf_counter()
    while (batch := spool.next_batch(sender.device, limit_rows=BATCH_ROWS)) is not None:
        sender.publish(batch)
        sender.wait({(batch.epoch, batch.seq)})
        spool.acknowledge(batch.seq, batch.epoch)
    elapsed = time.perf_counter() - began
    spool.close()
    return elapsed


def one_per_batch(device: str, n: int) -> list[TelemetryBatch]:
    """The same calls, each its own batch (one window of one call)."""
    epoch = uuid.uuid4().hex
    batches: list[TelemetryBatch] = []
    for block in calls(n, 1.8e9):
        for i in range(len(block.ts)):
            one = CallBlock(block.model, block.version, block.route, block.ts[i : i + 1], block.latency_ms[i : i + 1],
                            block.ok[i : i + 1])  # fmt: skip
            batches.append(TelemetryBatch(device, len(batches) + 1, aggregate([one]), 0, (), epoch))
    return batches


def per_record(sender: Sender, batches: list[TelemetryBatch]) -> float:
    """Publish every batch, pipelined; the seconds from first publish to last ack."""
    began = time.perf_counter()
    for batch in batches:
        sender.publish(batch)
    sender.wait({(b.epoch, b.seq) for b in batches})
    return time.perf_counter() - began


def stored(hub: HubProcess, device: str) -> int:
    rows = hub.admin.request("GET", f"/v1/telemetry?device={device}")
    return sum(int(w["count"]) for row in rows for w in row["windows"])


def phase(hub: HubProcess, broker_port: int, work: Path, mode: str, rep: int, n: int) -> dict[str, Any]:
    device = f"tput-{mode}-{rep}"
    sender = Sender(broker_port, device)
    process = psutil.Process(hub.process.pid)
    spool = filled_spool(work, device, n) if mode == "batched" else None
    singles = one_per_batch(device, n) if spool is None else []
    try:
        cpu0 = sum(process.cpu_times()[:2])
        wall0 = time.perf_counter()
        seconds = batched(sender, spool) if spool is not None else per_record(sender, singles)
        cores = (sum(process.cpu_times()[:2]) - cpu0) / (time.perf_counter() - wall0)
    finally:
        sender.close()
    return {"mode": mode, "calls": n, "seconds": seconds, "records_per_s": n / seconds, "hub_cpu_cores": cores,
            "stored": stored(hub, device)}  # fmt: skip


def spread(values: list[float], digits: int = 2) -> dict[str, float]:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 repeats of 20,000 / 1,000 calls")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=100_000, help="calls per batched phase")
    parser.add_argument("--single-calls", type=int, default=5_000, help="calls per per-record phase")
    args = parser.parse_args()
    repeats, n_batched, n_single = (2, 20_000, 1_000) if args.quick else (args.repeats, args.calls, args.single_calls)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _, pub = generate_keypair(work / "keys")
        (work / "broker").mkdir()
        broker = MosquittoProcess(work / "broker")
        hub = HubProcess(work, pub, broker=broker.url)
        try:
            for rep in range(repeats):
                order = ("batched", "single") if rep % 2 == 0 else ("single", "batched")
                for mode in order:
                    result = phase(hub, broker.port, work, mode, rep, n_batched if mode == "batched" else n_single)
                    results.append(result)
                    print(f"repeat {rep} {mode:7s}: {result['records_per_s']:10.0f} records/s, hub "
                          f"{result['hub_cpu_cores']:.2f} cores, {result['stored']}/{result['calls']} stored",
                          file=sys.stderr, flush=True)  # fmt: skip
        finally:
            hub.stop()
            broker.stop()
    fast = [r for r in results if r["mode"] == "batched"]
    slow = [r for r in results if r["mode"] == "single"]
    ratios = [b["records_per_s"] / s["records_per_s"] for b, s in zip(fast, slow, strict=True)]
    figures = {
        "records_per_s_ratio": round(statistics.median(ratios), 1),
        "ratio_spread": spread(ratios, 1),
        "batched_records_per_s": spread([r["records_per_s"] for r in fast], 0),
        "per_record_records_per_s": spread([r["records_per_s"] for r in slow], 0),
        "lost": sum(r["calls"] - r["stored"] for r in results),
        "hub_cpu_cores": round(max(r["hub_cpu_cores"] for r in fast), 2),
        "hub_cpu_cores_per_record": round(max(r["hub_cpu_cores"] for r in slow), 2),
        "repeats": repeats,
        "batch_calls": BLOCK * BATCH_ROWS,
        "quick": args.quick,
    }
    print(f"batched {figures['batched_records_per_s']} vs one record per message "
          f"{figures['per_record_records_per_s']} records/s: {figures['records_per_s_ratio']}x "
          f"({figures['ratio_spread']}); lost {figures['lost']}; hub at most {figures['hub_cpu_cores']} cores batched, "
          f"{figures['hub_cpu_cores_per_record']} per record", file=sys.stderr)  # fmt: skip
    print(json.dumps(figures))
    if figures["lost"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
