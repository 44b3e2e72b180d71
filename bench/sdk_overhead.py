"""SDK overhead per local call versus raw ONNX Runtime, interleaved in one process.

Raw ORT is the SDK's own ONNX Runtime session, called directly: the SDK path adds input validation,
the active-pointer check and telemetry recording (and the telemetry writer thread) around the very same
``session.run``. (``--separate-raw-session`` measures against a second session with the same options
instead, as this bench did up to 2026-11-30: two sessions mean two intra-op thread pools in one process,
and on 2 vCPUs the idle one's spinning worker slows the other; two identical raw sessions then differed
by up to 12 µs a call on the CNN.) Models: a 1k-parameter Gemm and the 284k-parameter digits CNN, batch
1. Blocks of calls alternate raw and SDK, each pair back to back. Prints a table and, last, one JSON
line: per model the medians of the per-block means (raw_us, sdk_us, ratio), the median and quartiles of
the per-pair differences (added_us, added_p25_us, added_p75_us: a VM's speed drifts between blocks; a
pair sees one speed, where the difference of the two medians can pair a fast block with a slow one),
and the CPUs other processes used meanwhile (other_cpus).

    python bench/sdk_overhead.py [--quick] [--separate-raw-session]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import artifact, digits_cnn_onnx, gemm_onnx

from device_profiles import get_profile
from edge_agent import EdgeClient
from edge_agent.config import AgentConfig
from edge_agent.protocol.signing import TrustStore, generate_keypair
from edge_agent.store import ModelStore

PROFILE = get_profile("x86-64-generic")


def raw_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = min(PROFILE.cpu_cores, 2)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def sdk_session(client: EdgeClient, name: str) -> ort.InferenceSession:
    """The ONNX Runtime session the SDK runs ``name`` on (a private attribute: a bench may look)."""
    loaded = client._active.loaded(name)
    if loaded is None or not hasattr(loaded.runtime, "session"):
        raise SystemExit(f"{name}: the SDK has no ONNX Runtime session loaded")
    return loaded.runtime.session


def measure(
    client: EdgeClient, name: str, session: ort.InferenceSession, x: np.ndarray, blocks: int, calls: int
) -> dict[str, float]:
    feed = {"input": x}
    for _ in range(200):
        client.infer(name, feed)
        session.run(None, feed)
    sdk, raw = [], []

    def time_raw() -> None:
        start = time.perf_counter()
        for _ in range(calls):
            session.run(None, feed)
        raw.append((time.perf_counter() - start) / calls * 1e6)

    def time_sdk() -> None:
        start = time.perf_counter()
        for _ in range(calls):
            client.infer(name, feed)
        sdk.append((time.perf_counter() - start) / calls * 1e6)

    for block in range(blocks):  # short blocks, alternating which goes first, so drift hits both alike
        first, second = (time_raw, time_sdk) if block % 2 == 0 else (time_sdk, time_raw)
        first()
        second()
    raw_us, sdk_us = statistics.median(raw), statistics.median(sdk)
    added = statistics.quantiles([s - r for s, r in zip(sdk, raw, strict=True)], n=4)  # adjacent blocks paired
    return {"raw_us": round(raw_us, 2), "sdk_us": round(sdk_us, 2), "added_us": round(added[1], 2),
            "ratio": round(sdk_us / raw_us, 3), "added_p25_us": round(added[0], 2),
            "added_p75_us": round(added[2], 2)}  # fmt: skip


def cpu_seconds() -> tuple[float, float]:
    """Busy CPU seconds of the whole machine and of this process so far (Linux /proc; zeros elsewhere)."""
    try:
        machine = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        mine = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(machine) - machine[3] - machine[4]) / tick, (int(mine[11]) + int(mine[12])) / tick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few blocks")
    parser.add_argument("--separate-raw-session", action="store_true", help="raw ORT on a second session")
    args = parser.parse_args()
    blocks, calls = (4, 200) if args.quick else (60, 500)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        key, _ = generate_keypair(work / "keys")
        state = work / "device"
        AgentConfig(device_id="bench", profile=PROFILE.id).save(state)
        store = ModelStore(state / "models")
        trust = TrustStore.from_dir(work / "keys")
        cases = {
            "gemm": (artifact(work, "gemm", gemm_onnx, ["batch", 32], ["batch", 30], key), np.ones((1, 32), "f4")),
            "cnn": (artifact(work, "cnn", digits_cnn_onnx, ["batch", 1, 8, 8], ["batch", 10], key, reference=True),
                    np.ones((1, 1, 8, 8), np.float32)),
        }  # fmt: skip
        results: dict[str, Any] = {}
        started, (busy, mine) = time.perf_counter(), cpu_seconds()
        with EdgeClient(state) as client:
            for name, (directory, x) in cases.items():
                manifest = store.install(directory, trust, PROFILE)
                store.activate(manifest.name, manifest.version)
                client.infer(name, {"input": x})  # loads it
                path = store.version_dir(name, "1.0.0") / "model.onnx"
                session = raw_session(path) if args.separate_raw_session else sdk_session(client, name)
                results[name] = measure(client, name, session, x, blocks, calls)
                r = results[name]
                print(f"{name:>5}: raw ORT {r['raw_us']:8.2f} µs   SDK {r['sdk_us']:8.2f} µs   "
                      f"added {r['added_us']:6.2f} µs (blocks p25 {r['added_p25_us']:.2f}, p75 {r['added_p75_us']:.2f})"
                      f"   ratio {r['ratio']:.3f}")  # fmt: skip
        busy_after, mine_after = cpu_seconds()
        others = max(0.0, (busy_after - busy - (mine_after - mine)) / (time.perf_counter() - started))
    figures = {f"{model}_{key}": value for model, r in results.items() for key, value in r.items()}
    print(f"other processes used {others:.2f} of {os.cpu_count()} CPUs meanwhile")
    raw = "separate" if args.separate_raw_session else "shared"
    print(json.dumps({"bench": "sdk_overhead", "quick": args.quick, "raw_session": raw, **figures,
                      "other_cpus": round(others, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
