"""Failover: how fast and how boundedly the SDK moves between routes when one of them fails.

1. Local runtime failing (a model that loads but raises at run time), policy local_first: every
   call's time to its cloud answer → `local_fail_to_cloud_p99_ms` (target ≤ 50 ms); the first call,
   which also loads the local model and opens the cloud stream, on its own → `local_fail_first_call_ms`.
2. Cloud hanging (accepts calls, never answers) and cloud unreachable (closed port), policy
   cloud_first with a 100 ms deadline: each call's latency minus the deadline →
   `cloud_dead_overrun_p99_ms` (target ≤ 20 ms; every call must be answered, locally).
3. Cloud down then back: time from the server being ready again to the first cloud-routed answer,
   the SDK's breaker vs pybreaker with its defaults (5 failures, 60 s) wrapped around the same client →
   `breaker_recovery_speedup` (target ≥ 10). `--quick` does not wait out pybreaker's 60 s: it takes
   its configured reset timeout as its recovery time (`pybreaker_measured: false`).

    python bench/failover.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import HubProcess, artifact, broken_gemm_onnx, free_port, gemm_onnx

from device_profiles import get_profile
from edge_agent import EdgeClient
from edge_agent.cloud import CloudClient
from edge_agent.config import AgentConfig
from edge_agent.protocol.oip import add_servicer
from edge_agent.protocol.signing import TrustStore, generate_keypair
from edge_agent.store import ModelStore

X = np.ones((1, 32), np.float32)
DEADLINE_S = 0.1


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99))


def device(work: Path, name: str, pub: Path, model: Path) -> Path:
    state = work / name
    (state / "trust").mkdir(parents=True)
    shutil.copy(pub, state / "trust")
    AgentConfig(device_id=name, profile="x86-64-generic").save(state)
    store = ModelStore(state / "models")
    manifest = store.install(model, TrustStore.from_dir(state / "trust"), get_profile("x86-64-generic"))
    store.activate(manifest.name, manifest.version)
    return state


class Hanging:
    """A cloud that accepts every call and never answers in time."""

    def __getattr__(self, name: str) -> Any:
        def hang(request: Any, context: grpc.ServicerContext) -> Any:
            time.sleep(5)
            context.abort(grpc.StatusCode.UNAVAILABLE, "too late")

        return hang


def local_failing(state: Path, url: str, calls: int) -> tuple[float, float]:
    """(first call ms, p99 ms of the calls after it): the first call also loads the local model and
    opens the cloud stream, a one-time cost reported on its own."""
    latencies = []
    with EdgeClient(state, cloud=url, telemetry=False) as client:
        for _ in range(calls + 1):
            start = time.perf_counter()
            result = client.infer("gemm", {"input": X})
            latencies.append((time.perf_counter() - start) * 1000)
            assert result.route == "cloud", result.reason
    return latencies[0], p99(latencies[1:])


def cloud_dead(state: Path, url: str, calls: int) -> list[float]:
    overruns = []
    with EdgeClient(state, cloud=url, policy="cloud_first", cloud_timeout_s=DEADLINE_S, telemetry=False) as client:
        for _ in range(calls):
            start = time.perf_counter()
            result = client.infer("gemm", {"input": X})
            overruns.append((time.perf_counter() - start - DEADLINE_S) * 1000)
            assert result.route == "local", result.reason
            time.sleep(0.01)
    return overruns


def recovery(call: Any, restart: Any, stop: Any, wait_open_s: float) -> float:
    """Seconds from the cloud being ready again to the first call the cloud answers."""
    stop()
    opened = time.monotonic() + wait_open_s
    while time.monotonic() < opened:  # calls fail while the cloud is down; the breaker opens
        call()
        time.sleep(0.01)
    ready_at = restart()
    while not call():
        time.sleep(0.01)
    return time.monotonic() - ready_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run; pybreaker's 60 s not waited out")
    args = parser.parse_args()
    calls = 50 if args.quick else 400
    work = Path(tempfile.mkdtemp(prefix="edgefed-bench-failover-"))
    results: dict[str, Any] = {"bench": "failover", "quick": args.quick}
    hub: HubProcess | None = None
    try:
        key, pub = generate_keypair(work / "keys")
        healthy = artifact(work, "gemm", gemm_onnx, ["batch", 32], ["batch", 30], key)
        hub = HubProcess(work, pub)
        hub.add(healthy)
        broken = artifact(work, "gemm", broken_gemm_onnx, ["batch", 32], ["batch", 30], key, dirname="broken")
        first_ms, p99_ms = local_failing(device(work, "d1", pub, broken), hub.url, calls)
        results |= {"local_fail_to_cloud_p99_ms": round(p99_ms, 3), "local_fail_first_call_ms": round(first_ms, 3)}
        print(f"local runtime failing: p99 {results['local_fail_to_cloud_p99_ms']} ms to the cloud answer")

        good_device = device(work, "d2", pub, healthy)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        add_servicer(Hanging(), server)
        hanging_port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        overruns = cloud_dead(good_device, f"grpc://127.0.0.1:{hanging_port}", calls // 2)
        overruns += cloud_dead(good_device, f"grpc://127.0.0.1:{free_port()}", calls // 2)
        server.stop(0)
        results["cloud_dead_overrun_p99_ms"] = round(p99(overruns), 3)
        results["cloud_dead_max_overrun_ms"] = round(max(overruns), 3)
        print(f"cloud hanging / unreachable: p99 overrun {results['cloud_dead_overrun_p99_ms']} ms past the "
              f"{DEADLINE_S * 1000:.0f} ms deadline, every call answered locally")  # fmt: skip

        port = hub.grpc_port
        state = {"hub": hub}

        def stop() -> None:
            state["hub"].stop()

        def restart() -> float:
            state["hub"] = HubProcess(work, pub, grpc_port=port)
            return time.monotonic()

        client = EdgeClient(good_device, cloud=hub.url, policy="cloud_first", cloud_timeout_s=DEADLINE_S,
                            telemetry=False)  # fmt: skip
        ours = recovery(lambda: client.infer("gemm", {"input": X}).route == "cloud", restart, stop, 0.5)
        client.close()
        results["sdk_breaker_recovery_s"] = round(ours, 3)
        if args.quick:
            theirs, measured = 60.0, False
        else:
            import pybreaker

            breaker = pybreaker.CircuitBreaker()  # defaults: fail_max=5, reset_timeout=60
            raw = CloudClient(f"grpc://127.0.0.1:{port}", DEADLINE_S)

            def guarded() -> bool:
                try:
                    breaker.call(raw.infer, "gemm", {"input": X})
                    return True
                except Exception:
                    return False

            theirs, measured = recovery(guarded, restart, stop, 0.5), True
            raw.close()
        hub = state["hub"]
        results |= {"pybreaker_recovery_s": round(theirs, 3), "pybreaker_measured": measured,
                    "breaker_recovery_speedup": round(theirs / ours, 1)}  # fmt: skip
        print(f"cloud back: SDK breaker routes to it after {ours:.3f} s, pybreaker defaults after {theirs:.1f} s "
              f"({'measured' if measured else 'its reset timeout'}): {theirs / ours:.0f}x sooner")  # fmt: skip
    finally:
        if hub is not None:
            hub.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
