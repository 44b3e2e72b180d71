"""Telemetry ingest with 1 and 2 hub replicas (issue 16), in the same run, on one Mosquitto and one
PostgreSQL database: records/s, CPU per stored record, and that every record is stored exactly once.

Replica ``a`` (`cloud-hub serve --replica a --registry postgresql://...`, its own process) runs throughout;
replica ``b`` (a copy of a's state directory) is started for each 2-replica phase and stopped after it, so
the two settings alternate (``1, 2`` then ``2, 1``, ...). In a phase one load generator (one MQTT
client, ``--devices`` device ids) publishes ``--records`` telemetry batches (one window of 100 calls each,
as an agent sends them; sequence numbers per device from 1) at QoS 1 with up to ``IN_FLIGHT``
unacknowledged, and waits for the hub's acknowledgement of every one. Both replicas consume through the
MQTT shared subscription ``$share/edgefed-hubs/...``; the (device, epoch, seq) dedup is the database's.

Per phase: ``records_per_s`` = records / seconds from the first publish to the last acknowledgement;
``cpu_ms_per_1k_records`` = CPU seconds of the replica processes (psutil, user + system) per 1,000
records; ``db_cpu_ms_per_1k_records`` the same for the PostgreSQL server's processes; ``lost`` =
records sent - distinct (device, epoch, seq) stored; ``duplicates`` = stored rows - distinct ones, plus
the replicas' own count of batches they stored (``telemetry_stored`` in ``GET /v1/status``) - rows.
Median, min and max over the repeats; the 2 : 1 ratio; a projection to N replicas with its assumptions.

    python bench/replicas.py [--quick] [--records 6000] [--devices 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil  # type: ignore[import-untyped]
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/pg_server.py: the PostgreSQL the tests use

from common import HubProcess, MosquittoProcess, free_port  # noqa: E402
from pg_server import fresh_database, postgres_server  # noqa: E402

from edge_agent.protocol.messages import TelemetryAck, TelemetryBatch, TelemetryWindow, from_wire, to_wire  # noqa: E402
from edge_agent.protocol.signing import generate_keypair  # noqa: E402
from edge_agent.protocol.topics import DEFAULT_ROOT, Topics  # noqa: E402

IN_FLIGHT = 200
ACK_TIMEOUT_S = 180.0


class Generator:
    """One MQTT client publishing telemetry for many device ids and counting the hub's acknowledgements."""

    def __init__(self, broker_port: int, prefix: str, devices: int) -> None:
        self.topics = Topics(DEFAULT_ROOT)
        self.devices = [f"{prefix}-d{i:03d}" for i in range(devices)]
        self.epoch = uuid.uuid4().hex
        self.acked: set[tuple[str, int]] = set()
        self.changed = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{prefix}", protocol=mqtt.MQTTv311)
        self.client.max_inflight_messages_set(IN_FLIGHT)
        self.client.max_queued_messages_set(0)
        self.client.on_message = self._on_ack
        self.client.connect("127.0.0.1", broker_port)
        self.client.subscribe(self.topics.all_devices("telemetry/ack"), qos=1)
        self.client.loop_start()

    def _on_ack(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        parsed = self.topics.parse_device_topic(message.topic)
        ack = from_wire(TelemetryAck, bytes(message.payload))
        with self.changed:
            if parsed is not None:
                self.acked.add((parsed[0], ack.seq))
            self.changed.notify_all()

    def run(self, records: int) -> float:
        """Publish ``records`` batches round-robin over the devices, at most IN_FLIGHT unacknowledged; the
        seconds from the first publish to the last acknowledgement."""
        window = TelemetryWindow("gemm", "1.0.0", "local", 1.0, 2.0, 100, 0, 25.0, (100,))
        began = time.perf_counter()
        for n in range(records):
            device, seq = self.devices[n % len(self.devices)], n // len(self.devices) + 1
            with self.changed:
                if not self.changed.wait_for(lambda sent=n: sent - len(self.acked) < IN_FLIGHT, timeout=ACK_TIMEOUT_S):
                    raise RuntimeError(f"no acknowledgement in {ACK_TIMEOUT_S:.0f} s ({len(self.acked)} of {n})")
            batch = TelemetryBatch(device, seq, (window,), 0, (), self.epoch)
            self.client.publish(self.topics.telemetry(device), to_wire(batch), qos=1)
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.acked) >= records, timeout=ACK_TIMEOUT_S):
                raise RuntimeError(f"{records - len(self.acked)} of {records} batches never acknowledged")
        return time.perf_counter() - began

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def postgres_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith("postgres")]


def stored(database: str, prefix: str) -> tuple[int, int]:
    """(rows, distinct (device, epoch, seq)) of the phase's devices in the telemetry table."""
    with psycopg.connect(database) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT (device_id, epoch, seq)) FROM telemetry WHERE device_id LIKE %s",
            [f"{prefix}-%"],
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def telemetry_stored(hubs: list[HubProcess]) -> int:
    return sum(int(h.admin.request("GET", "/v1/status")["telemetry_stored"]) for h in hubs)


def phase(hubs: list[HubProcess], broker_port: int, database: str, records: int, devices: int,
          label: str) -> dict[str, Any]:  # fmt: skip
    prefix = f"{label}-{uuid.uuid4().hex[:6]}"
    generator = Generator(broker_port, prefix, devices)
    replicas = [psutil.Process(h.process.pid) for h in hubs]
    database_processes = postgres_processes()
    counted_before = telemetry_stored(hubs)
    try:
        hub_cpu0, db_cpu0 = cpu_seconds(replicas), cpu_seconds(database_processes)
        seconds = generator.run(records)
        hub_cpu, db_cpu = cpu_seconds(replicas) - hub_cpu0, cpu_seconds(database_processes) - db_cpu0
    finally:
        generator.close()
    rows, distinct = stored(database, prefix)
    counted = telemetry_stored(hubs) - counted_before
    return {"replicas": len(hubs), "records": records, "seconds": round(seconds, 3),
            "records_per_s": round(records / seconds, 1), "cpu_ms_per_1k_records": round(hub_cpu * 1e6 / records, 1),
            "db_cpu_ms_per_1k_records": round(db_cpu * 1e6 / records, 1), "lost": records - distinct,
            "duplicates": (rows - distinct) + (counted - rows), "stored_by_replicas": counted}  # fmt: skip


def spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1), "max": round(max(values), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat of 1,000 records (CI)")
    parser.add_argument("--records", type=int, default=6000, help="telemetry batches per phase (default 6000)")
    parser.add_argument("--devices", type=int, default=40, help="device ids the batches come from (default 40)")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of phases (default 3)")
    args = parser.parse_args()
    records, repeats = (1000, 1) if args.quick else (args.records, args.repeats)
    work = Path(tempfile.mkdtemp(prefix="edgefed-bench-replicas-"))
    wall = time.monotonic()
    results: list[dict[str, Any]] = []
    hubs: list[HubProcess] = []
    try:
        _, pub = generate_keypair(work / "keys")
        with postgres_server(free_port()) as admin_url:
            if admin_url is None:
                raise SystemExit("no PostgreSQL: set EDGEFED_TEST_POSTGRES or install postgresql (make system-deps)")
            with fresh_database(admin_url) as database:
                broker = MosquittoProcess(work)
                try:
                    common = ("--registry", database, "--serving-profile", "x86-64-generic")
                    hubs.append(HubProcess(work, pub, *common, "--replica", "a", broker=broker.url, state=work / "a"))
                    shutil.copytree(work / "a", work / "b", ignore=shutil.ignore_patterns("registry.db*", "*.log"))
                    for rep in range(repeats):
                        for count in (1, 2) if rep % 2 == 0 else (2, 1):
                            if count == 2:
                                hubs.append(HubProcess(work, pub, *common, "--replica", "b", broker=broker.url,
                                                       state=work / "b"))  # fmt: skip
                                time.sleep(1.0)  # its shared subscriptions in place
                            result = phase(hubs, broker.port, database, records, args.devices, f"r{count}-{rep}")
                            print(json.dumps(result), flush=True)
                            results.append(result)
                            if count == 2:
                                hubs.pop().stop()
                finally:
                    for hub in hubs:
                        hub.stop()
                    broker.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results, records, repeats, args.devices, args.quick, time.monotonic() - wall)


def report(results: list[dict[str, Any]], records: int, repeats: int, devices: int, quick: bool,
           wall_s: float) -> None:  # fmt: skip
    by = {n: [r for r in results if r["replicas"] == n] for n in (1, 2)}
    rate = {n: spread([r["records_per_s"] for r in rs]) for n, rs in by.items()}
    cpu = {n: spread([r["cpu_ms_per_1k_records"] for r in rs]) for n, rs in by.items()}
    db_cpu = {n: spread([r["db_cpu_ms_per_1k_records"] for r in rs]) for n, rs in by.items()}
    lost, duplicates = sum(r["lost"] for r in results), sum(r["duplicates"] for r in results)
    ratio = rate[2]["median"] / rate[1]["median"]
    print(f"{'replicas':<9} {'records/s (min-max)':>26} {'hub CPU ms / 1k':>22} {'db CPU ms / 1k':>22}")
    for n in (1, 2):
        print(f"{n:<9} {rate[n]['median']:>10.0f} ({rate[n]['min']:.0f}-{rate[n]['max']:.0f}) "
              f"{cpu[n]['median']:>12.0f} ({cpu[n]['min']:.0f}-{cpu[n]['max']:.0f}) "
              f"{db_cpu[n]['median']:>12.0f} ({db_cpu[n]['min']:.0f}-{db_cpu[n]['max']:.0f})")  # fmt: skip
    # Projection: each replica on its own cores ingests 1000 / (its CPU ms per 1k) records per core-second;
    # the database's share per record and its one-at-a-time telemetry insert bound the cluster.
    per_core = 1e6 / cpu[1]["median"]
    db_per_core = 1e6 / db_cpu[1]["median"] if db_cpu[1]["median"] else float("inf")
    print(
        f"2 replicas : 1 = {ratio:.2f}x records/s on this {os.cpu_count()}-core machine (generator, broker, "
        f"database and replicas share it); lost {lost}, duplicates {duplicates}"
    )
    print(f"projection: a replica on one core of its own ingests ~{per_core:.0f} records/s, so N replicas "
          f"~N x {per_core:.0f}/s until the database (~{db_per_core:.0f} records/s per database core at "
          f"{db_cpu[1]['median']:.0f} CPU ms / 1k, inserts serialised by its telemetry lock) is the limit")  # fmt: skip
    print(json.dumps({
        "bench": "replicas", "quick": quick, "records": records, "repeats": repeats, "devices": devices,
        "replicas": [1, 2], "records_per_s": {str(n): rate[n]["median"] for n in (1, 2)},
        "records_per_s_spread": {str(n): rate[n] for n in (1, 2)},
        "cpu_ms_per_1k_records": {str(n): cpu[n]["median"] for n in (1, 2)},
        "db_cpu_ms_per_1k_records": {str(n): db_cpu[n]["median"] for n in (1, 2)},
        "records_per_s_ratio_2_to_1": round(ratio, 2), "duplicates": duplicates, "lost": lost,
        "projected_records_per_s_per_replica_core": round(per_core), "projected_db_records_per_s_per_core":
        round(db_per_core) if db_per_core != float("inf") else None,
        "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "wall_s": round(wall_s, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
