"""SDK overhead per local call versus raw ONNX Runtime, interleaved in one process.

Both run the same model file with the same session options; the SDK path includes input validation,
the active-pointer check and telemetry recording. Models: a 1k-parameter Gemm and the 284k-parameter
digits CNN (batch 1). Prints a table and, last, one JSON line.

    python bench/sdk_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import json
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
    return {"raw_us": round(raw_us, 2), "sdk_us": round(sdk_us, 2), "added_us": round(sdk_us - raw_us, 2),
            "ratio": round(sdk_us / raw_us, 3)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few blocks")
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
        with EdgeClient(state) as client:
            for name, (directory, x) in cases.items():
                manifest = store.install(directory, trust, PROFILE)
                store.activate(manifest.name, manifest.version)
                path = store.version_dir(name, "1.0.0") / "model.onnx"
                results[name] = measure(client, name, raw_session(path), x, blocks, calls)
                r = results[name]
                print(f"{name:>5}: raw ORT {r['raw_us']:8.2f} µs   SDK {r['sdk_us']:8.2f} µs   "
                      f"added {r['added_us']:6.2f} µs   ratio {r['ratio']:.3f}")  # fmt: skip
    figures = {f"{model}_{key}": value for model, r in results.items() for key, value in r.items()}
    print(json.dumps({"bench": "sdk_overhead", "quick": args.quick, **figures}))


if __name__ == "__main__":
    main()
