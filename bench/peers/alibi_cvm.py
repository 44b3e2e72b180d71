"""alibi-detect's online Cramer-von Mises detector on bench/drift.py's streams (run in .bench-venvs/alibi).

Reads the reference samples and the stacked streams (.npz), feeds each stream one sample at a time to
`CVMDriftOnline.predict` from a fresh state, and prints one JSON line: per scenario the delay of the first
alarm at or after the change point (samples seen after it, or null), alarms before it, the clean stream's
false alarms, and the configuration. Standalone: it imports nothing from edgefed.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np


def run_stream(detector: Any, stream: np.ndarray, change: int) -> tuple[int | None, int, int]:
    """(delay or None, alarms before the change point, samples fed); resets after a false alarm."""
    detector.reset_state()
    early = 0
    for t in range(len(stream)):
        if detector.predict(stream[t], return_test_stat=False)["data"]["is_drift"]:
            if t >= change:
                return t - change + 1, early, t + 1
            early += 1
            detector.reset_state()
    return None, early, len(stream)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", required=True)
    parser.add_argument("--streams", required=True)
    parser.add_argument("--clean")
    parser.add_argument("--change", type=int, required=True)
    parser.add_argument("--ert", type=float, default=100_000)
    parser.add_argument("--window-sizes", default="50,200")
    parser.add_argument("--reference-size", type=int, default=1_000)
    parser.add_argument("--n-bootstraps", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=256, help="simulated streams per batch")
    parser.add_argument("--seeds", type=int, default=None, help="streams per scenario (default: all)")
    args = parser.parse_args()
    from alibi_detect.cd import CVMDriftOnline  # type: ignore[import-not-found]

    reference = np.load(args.reference)["x"].astype(np.float64)
    subset = reference[np.random.default_rng(0).choice(len(reference), args.reference_size, replace=False)]
    windows = [int(w) for w in args.window_sizes.split(",")]
    started = time.monotonic()
    np.random.seed(0)  # alibi draws its bootstrap streams from numpy's global generator
    detector = CVMDriftOnline(
        subset,
        ert=args.ert,
        window_sizes=windows,
        n_bootstraps=args.n_bootstraps,
        batch_size=args.batch_size,
        verbose=False,
    )
    configure_s = time.monotonic() - started
    delays: dict[str, list[int | None]] = {}
    pre_change = 0
    fed = 0
    started = time.monotonic()
    with np.load(args.streams) as streams:
        for kind in streams.files:
            delays[kind] = []
            for stream in streams[kind][: args.seeds]:
                delay, early, n = run_stream(detector, stream.astype(np.float64), args.change)
                delays[kind].append(delay)
                pre_change += early
                fed += n
    clean_false, clean_samples = 0, 0
    if args.clean:
        clean = np.load(args.clean)["x"].astype(np.float64)
        detector.reset_state()
        for t in range(len(clean)):
            if detector.predict(clean[t], return_test_stat=False)["data"]["is_drift"]:
                clean_false += 1
                detector.reset_state()
        clean_samples = len(clean)
        fed += len(clean)
    run_s = time.monotonic() - started
    import alibi_detect  # type: ignore[import-not-found]

    print(
        json.dumps(
            {
                "version": alibi_detect.__version__,
                "config": {
                    "ert": args.ert,
                    "window_sizes": windows,
                    "reference_samples": args.reference_size,
                    "n_bootstraps": args.n_bootstraps,
                    "batch_size": args.batch_size,
                },
                "delays": delays,
                "pre_change_false_alarms": pre_change,
                "clean_samples": clean_samples,
                "clean_false_alarms": clean_false,
                "configure_s": round(configure_s, 1),
                "us_per_sample": round(run_s / max(fed, 1) * 1e6, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
