"""Cloud inference: the SDK and the hub's OIP server against tritonclient and KServe, one run, one model.

1. Latency, one client: the SDK's cloud call vs `tritonclient.grpc` against the hub's server, same
   payload (digits CNN, batch 1), in blocks interleaved with tritonclient against the unbatched hub and
   KServe → `sdk_vs_tritonclient_ratio` (target ≤ 0.8).
2. Throughput at 32 concurrent tritonclient clients (grpc.aio, a connection each, one process): the hub
   (`--inference-processes` = CPU count) vs KServe's Python ModelServer (its gRPC server is one
   process) serving the same ONNX file through ONNX Runtime, same session options →
   `vs_kserve_rps_ratio` (≥ 1.5).
3. Median latency SDK + hub vs tritonclient + KServe → `vs_kserve_latency_ratio` (≤ 0.5).
4. Dynamic batching on vs off: throughput at 32 clients (`batching_throughput_ratio`, ≥ 1) and the
   1-client median latency it adds.

KServe runs from `.kserve-venv` (`make bench-venv`; tests/kserve_peer.py starts it); without it its
figures are null.
    python bench/cloud.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/kserve_peer.py: the KServe peer

from common import HubProcess, artifact, digits_cnn_onnx
from kserve_peer import KServeProcess, kserve_installed

X = np.random.default_rng(0).random((1, 1, 8, 8), np.float32)
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # gRPC would share one connection per target
PROCESSES = str(len(os.sched_getaffinity(0)))  # the hub's --inference-processes: one per CPU


def triton_call(port: int) -> Any:
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    tensor = triton.InferInput("input", [1, 1, 8, 8], "FP32")
    tensor.set_data_from_numpy(X)

    def call() -> None:
        client.infer("digits-cnn", [tensor]).as_numpy("output")

    return call


def sdk_call(state: Path, url: str) -> Any:
    from edge_agent import EdgeClient

    state.mkdir(exist_ok=True)  # a device with no agent configuration: the SDK's cloud route alone
    client = EdgeClient(state, cloud=url, policy="cloud_only", cloud_timeout_s=5)
    return lambda: client.infer("digits-cnn", {"input": X})


def median_ms(call: Any, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def interleaved(calls: dict[str, Any], blocks: int, n: int) -> dict[str, float]:
    """Median over blocks of each call's median latency (ms); each block runs every call ``n`` times,
    starting from a different one each block, so drift on the machine hits every call alike."""
    names = list(calls)
    for name in names * 20:
        calls[name]()
    medians: dict[str, list[float]] = {name: [] for name in names}
    for block in range(blocks):
        for name in names[block % len(names) :] + names[: block % len(names)]:
            medians[name].append(median_ms(calls[name], n))
    return {name: statistics.median(values) for name, values in medians.items()}


def load_worker(port: int, clients: int, duration_s: float) -> None:
    """Child process: ``clients`` tritonclient (grpc.aio) clients, each on its own connection like a
    fleet of devices, calling as fast as they can; prints the count. The asyncio client costs the
    shared CPU about a third of what threads of the blocking client do, leaving it to the server."""
    import asyncio

    import tritonclient.grpc.aio as triton

    async def run() -> int:
        stop = time.monotonic() + duration_s

        async def client_loop() -> int:
            count = 0
            client = triton.InferenceServerClient(f"127.0.0.1:{port}", channel_args=OWN_CONNECTION)
            tensor = triton.InferInput("input", [1, 1, 8, 8], "FP32")
            tensor.set_data_from_numpy(X)
            while time.monotonic() < stop:
                (await client.infer("digits-cnn", [tensor])).as_numpy("output")
                count += 1
            await client.close()
            return count

        return sum(await asyncio.gather(*(client_loop() for _ in range(clients))))

    print(asyncio.run(run()))


def throughput(port: int, clients: int, duration_s: float) -> float:
    command = [sys.executable, __file__, "--load-worker", str(port), str(clients), str(duration_s)]
    start = time.perf_counter()
    total = int(subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True).stdout.strip() or 0)
    return total / (time.perf_counter() - start)


def wait_ready(port: int, timeout_s: float = 60) -> None:
    import tritonclient.grpc as triton

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if triton.InferenceServerClient(f"127.0.0.1:{port}").is_model_ready("digits-cnn"):
                return
        except Exception:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"no server ready on port {port}")


def kserve(model: Path, work: Path) -> KServeProcess | None:
    """KServe's Python ModelServer serving ``model`` as digits-cnn (tests/kserve_server.py), or None
    when `.kserve-venv` is not built."""
    if not kserve_installed():
        return None
    return KServeProcess(work, {"digits-cnn": model})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: short phases")
    parser.add_argument("--load-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_worker:
        return load_worker(int(args.load_worker[0]), int(args.load_worker[1]), float(args.load_worker[2]))
    blocks, n, duration, rounds = (4, 50, 1.0, 1) if args.quick else (20, 200, 4.0, 5)
    from edge_agent.protocol.signing import generate_keypair

    work = Path(tempfile.mkdtemp(prefix="edgefed-bench-cloud-"))
    servers: list[Any] = []
    results: dict[str, Any] = {"bench": "cloud", "quick": args.quick}
    try:
        key, pub = generate_keypair(work / "keys")
        model_dir = artifact(work, "digits-cnn", digits_cnn_onnx, ["batch", 1, 8, 8], ["batch", 10], key)
        hub = HubProcess(work, pub, "--inference-processes", PROCESSES)
        unbatched = HubProcess(work, pub, "--inference-processes", PROCESSES, "--max-batch-rows", "1")
        servers += [hub, unbatched]
        for server in (hub, unbatched):
            server.add(model_dir)
            wait_ready(server.grpc_port)
        peer = kserve(model_dir / "model.onnx", work)
        ports = {"hub": hub.grpc_port, "unbatched": unbatched.grpc_port}
        if peer is not None:
            servers.append(peer)
            ports["kserve"] = peer.grpc_port
        calls = {"sdk": sdk_call(work / "device", hub.url)} | {name: triton_call(port) for name, port in ports.items()}
        ms = interleaved(calls, blocks, n)
        print(f"1 client: SDK {ms['sdk']:.3f} ms vs tritonclient {ms['hub']:.3f} ms "
              f"(ratio {ms['sdk'] / ms['hub']:.2f})")  # fmt: skip
        rps: dict[str, list[float]] = {name: [] for name in ports}
        names = list(ports)
        for r in range(rounds):  # all servers up at once, measured in turn (rotating who goes first)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                rps[name].append(throughput(ports[name], 32, duration))
        rate = {name: statistics.median(values) for name, values in rps.items()}
        results |= {"sdk_hub_ms": round(ms["sdk"], 3), "tritonclient_hub_ms": round(ms["hub"], 3),
                    "sdk_vs_tritonclient_ratio": round(ms["sdk"] / ms["hub"], 3),
                    "hub_rps_32": round(rate["hub"], 1), "hub_unbatched_rps_32": round(rate["unbatched"], 1),
                    "batching_throughput_ratio": round(rate["hub"] / rate["unbatched"], 3),
                    "batching_added_ms_1_client": round(ms["hub"] - ms["unbatched"], 3)}  # fmt: skip
        print(f"32 clients: hub {rate['hub']:.0f} req/s with dynamic batching, {rate['unbatched']:.0f} without; "
              f"1 client: {ms['hub']:.3f} vs {ms['unbatched']:.3f} ms")  # fmt: skip
        if "kserve" not in rate:
            print("KServe not installed (make bench-venv): its figures are null")
            results |= {"kserve_rps_32": None, "vs_kserve_rps_ratio": None, "vs_kserve_latency_ratio": None}
        else:
            results |= {"kserve_tritonclient_ms": round(ms["kserve"], 3),
                        "kserve_rps_32": round(rate["kserve"], 1),
                        "vs_kserve_rps_ratio": round(rate["hub"] / rate["kserve"], 3),
                        "vs_kserve_latency_ratio": round(ms["sdk"] / ms["kserve"], 3)}  # fmt: skip
            print(f"KServe: {rate['kserve']:.0f} req/s at 32 clients (hub {rate['hub'] / rate['kserve']:.2f}x); "
                  f"tritonclient+KServe {ms['kserve']:.3f} ms vs SDK+hub {ms['sdk']:.3f} ms")  # fmt: skip
        results["rps_rounds"] = {name: [round(v) for v in values] for name, values in rps.items()}
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
