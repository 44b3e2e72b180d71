"""Evidently's DataDriftPreset on bench/drift.py's streams (run in .bench-venvs/evidently).

Windows of WINDOW samples every STEP samples, each a `Report([DataDriftPreset()])` against the reference
samples with Evidently's defaults (for numeric columns with more than 1,000 reference rows: normed
Wasserstein distance, threshold 0.1; dataset drift when at least half of the columns drift). The alarm
is the dataset-drift flag. Per stream, windows end from the change point on until the first alarm or
until the window is wholly drifted plus one window (later windows hold the same drifted distribution);
the clean stream's windows give its false alarms. Prints one JSON line. Imports nothing from edgefed.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", required=True)
    parser.add_argument("--streams", required=True)
    parser.add_argument("--clean")
    parser.add_argument("--change", type=int, required=True)
    parser.add_argument("--window", type=int, default=1_000)
    parser.add_argument("--step", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=None, help="streams per scenario (default: all)")
    parser.add_argument("--single-seeds", type=int, default=3, help="streams of the 'single' scenario")
    parser.add_argument("--clean-windows", type=int, default=30)
    args = parser.parse_args()
    import pandas as pd  # type: ignore[import-untyped]
    from evidently import Report  # type: ignore[import-not-found]
    from evidently.presets import DataDriftPreset  # type: ignore[import-not-found]

    reference = np.load(args.reference)["x"].astype(np.float64)
    columns = [f"x{i}" for i in range(reference.shape[1])]
    reference_frame = pd.DataFrame(reference, columns=columns)
    reports = 0

    def drifted(window: np.ndarray) -> bool:
        nonlocal reports
        reports += 1
        snapshot = Report([DataDriftPreset()]).run(
            current_data=pd.DataFrame(window, columns=columns), reference_data=reference_frame
        )
        for metric in snapshot.dict()["metrics"]:
            if metric["metric_name"].startswith("DriftedColumnsCount"):
                share = float(metric["value"]["share"])
                drift_share = float(metric["metric_name"].split("drift_share=")[1].rstrip(")"))
                return share >= drift_share
        raise RuntimeError("no DriftedColumnsCount in Evidently's report")

    started = time.monotonic()
    delays: dict[str, list[int | None]] = {}
    last_end = args.change + args.window + args.step  # a wholly drifted window, and one more
    with np.load(args.streams) as streams:
        for kind in streams.files:
            delays[kind] = []
            count = args.single_seeds if kind == "single" else args.seeds
            for stream in streams[kind][:count]:
                delay = None
                first = args.change + args.step - 1 - (args.change % args.step)  # windows end every step
                for end in range(max(first, args.window - 1), min(last_end, len(stream)), args.step):
                    if drifted(stream[end - args.window + 1 : end + 1]):
                        delay = end - args.change + 1
                        break
                delays[kind].append(delay)
    clean_false, clean_windows = 0, 0
    if args.clean:
        clean = np.load(args.clean)["x"].astype(np.float64)
        for end in range(args.window - 1, len(clean), args.step)[: args.clean_windows]:
            clean_windows += 1
            clean_false += drifted(clean[end - args.window + 1 : end + 1])
    import evidently  # type: ignore[import-not-found]

    print(
        json.dumps(
            {
                "version": evidently.__version__,
                "config": {
                    "preset": "DataDriftPreset()",
                    "window": args.window,
                    "step": args.step,
                    "stattest": "Evidently default (normed Wasserstein, threshold 0.1, for >1,000 reference rows)",
                    "drift_share": 0.5,
                    "single_feature_seeds": args.single_seeds,
                },
                "delays": delays,
                "clean_windows": clean_windows,
                "clean_false_alarms": clean_false,
                "s_per_report": round((time.monotonic() - started) / max(reports, 1), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
