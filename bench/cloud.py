"""Cloud inference: the SDK and the hub's OIP server against tritonclient and KServe, one run, one model.

1. Latency, one client: the SDK's cloud call vs `tritonclient.grpc` against the hub's server, same
   payload (digits CNN, batch 1), interleaved blocks → `sdk_vs_tritonclient_ratio` (target ≤ 0.8).
2. Throughput at 32 concurrent tritonclient clients (4 processes x 8 threads): hub vs KServe's Python
   ModelServer serving the same ONNX file through ONNX Runtime → `vs_kserve_rps_ratio` (≥ 1.5).
3. Median latency SDK + hub vs tritonclient + KServe → `vs_kserve_latency_ratio` (≤ 0.5).
4. Dynamic batching on vs off: throughput at 32 clients (`batching_throughput_ratio`, ≥ 1) and the
   1-client median latency it adds.

KServe runs from `.bench-venv` (`make bench-venv`); without it its figures are null.
    python bench/cloud.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, HubProcess, artifact, digits_cnn_onnx, free_port

KSERVE_PYTHON = ROOT / ".bench-venv" / "bin" / "python"
X = np.random.default_rng(0).random((1, 1, 8, 8), np.float32)


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

    client = EdgeClient(state, cloud=url, policy="cloud_only", cloud_timeout_s=5)
    return lambda: client.infer("digits-cnn", {"input": X})


def median_ms(call: Any, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def interleaved(a: Any, b: Any, blocks: int, n: int) -> tuple[float, float]:
    for _ in range(20):
        a(), b()
    ma, mb = [], []
    for block in range(blocks):
        first, second = (a, b) if block % 2 == 0 else (b, a)
        r1, r2 = median_ms(first, n), median_ms(second, n)
        (ma, mb)[block % 2].append(r1)
        (mb, ma)[block % 2].append(r2)
    return statistics.median(ma), statistics.median(mb)


def load_worker(port: int, threads: int, duration_s: float) -> None:
    """Child process: `threads` tritonclient clients calling as fast as they can; prints the count."""
    counts = [0] * threads
    stop = time.monotonic() + duration_s

    def run(i: int) -> None:
        call = triton_call(port)
        while time.monotonic() < stop:
            call()
            counts[i] += 1

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    print(sum(counts))


def throughput(port: int, clients: int, duration_s: float) -> float:
    processes = 4 if clients >= 4 else 1
    command = [sys.executable, __file__, "--load-worker", str(port), str(clients // processes), str(duration_s)]
    start = time.perf_counter()
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    total = sum(int(w.communicate()[0].strip() or 0) for w in workers)
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


def kserve(model: Path, work: Path) -> tuple[subprocess.Popen[bytes], int] | None:
    if not KSERVE_PYTHON.exists():
        return None
    port = free_port()
    log = open(work / "kserve.log", "wb")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen([str(KSERVE_PYTHON), str(ROOT / "bench/kserve_server.py"), str(model), str(port),
                                str(free_port())], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    wait_ready(port)
    return process, port


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
        hub = HubProcess(work, pub)
        unbatched = HubProcess(work, pub, "--max-batch-rows", "1")
        servers += [hub, unbatched]
        for server in (hub, unbatched):
            server.add(model_dir)
            wait_ready(server.grpc_port)
        peer = kserve(model_dir / "model.onnx", work)
        ports = {"hub": hub.grpc_port, "unbatched": unbatched.grpc_port}
        if peer is not None:
            servers.append(peer[0])
            ports["kserve"] = peer[1]
        sdk, triton = sdk_call(work / "device", hub.url), triton_call(hub.grpc_port)
        sdk_ms, triton_ms = interleaved(sdk, triton, blocks, n)
        print(f"1 client: SDK {sdk_ms:.3f} ms vs tritonclient {triton_ms:.3f} ms (ratio {sdk_ms / triton_ms:.2f})")
        one_client = {name: median_ms(triton_call(port), n) for name, port in ports.items()}
        rps: dict[str, list[float]] = {name: [] for name in ports}
        for _ in range(rounds):  # all servers up at once, measured in turn: drift hits each alike
            for name, port in ports.items():
                rps[name].append(throughput(port, 32, duration))
        rate = {name: statistics.median(values) for name, values in rps.items()}
        results |= {"sdk_hub_ms": round(sdk_ms, 3), "tritonclient_hub_ms": round(triton_ms, 3),
                    "sdk_vs_tritonclient_ratio": round(sdk_ms / triton_ms, 3),
                    "hub_rps_32": round(rate["hub"], 1), "hub_unbatched_rps_32": round(rate["unbatched"], 1),
                    "batching_throughput_ratio": round(rate["hub"] / rate["unbatched"], 3),
                    "batching_added_ms_1_client": round(one_client["hub"] - one_client["unbatched"], 3)}  # fmt: skip
        print(f"32 clients: hub {rate['hub']:.0f} req/s with dynamic batching, {rate['unbatched']:.0f} without; "
              f"1 client: {one_client['hub']:.3f} vs {one_client['unbatched']:.3f} ms")  # fmt: skip
        if "kserve" not in rate:
            print("KServe not installed (make bench-venv): its figures are null")
            results |= {"kserve_rps_32": None, "vs_kserve_rps_ratio": None, "vs_kserve_latency_ratio": None}
        else:
            results |= {"kserve_tritonclient_ms": round(one_client["kserve"], 3),
                        "kserve_rps_32": round(rate["kserve"], 1),
                        "vs_kserve_rps_ratio": round(rate["hub"] / rate["kserve"], 3),
                        "vs_kserve_latency_ratio": round(sdk_ms / one_client["kserve"], 3)}  # fmt: skip
            print(f"KServe: {rate['kserve']:.0f} req/s at 32 clients (hub {rate['hub'] / rate['kserve']:.2f}x); "
                  f"tritonclient+KServe {one_client['kserve']:.3f} ms vs SDK+hub {sdk_ms:.3f} ms")  # fmt: skip
        results["rps_rounds"] = {name: [round(v) for v in values] for name, values in rps.items()}
    finally:
        for server in servers:
            if isinstance(server, HubProcess):
                server.stop()
            else:
                server.terminate()
                server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
