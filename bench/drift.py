"""Drift detection (issue 12): how fast `cloud-hub drift backtest` alarms, and how quiet it stays.

Every edgefed figure comes from the operator command `cloud-hub drift backtest ARTIFACT DATA.npz --json`
(each stream saved as .npz, run as a subprocess): recorded inputs through the artifact's model, the
device's binning (`Sketch.count`) and the hub's `SequentialDetector`, windows of 50 calls, the default
target of 1 false alarm per 100,000 samples.

The reference: a signed artifact of a Gemm classifier on 10 features (3 classes) whose reference.json
is built from REFERENCE_SAMPLES clean N(0, 1) samples. Seeded streams of CHANGE clean samples, then
POST drifted ones:

- (a) a 0.5 sigma mean shift in all 10 features -> delay (samples after the change point up to the
  alarm); an alarm before the change point is a false alarm, not a detection;
- (b) the same shift in one feature only -> `detected_single_feature` (fraction of seeds);
- (c) sigma 1 -> 1.5 in all features -> `detected_variance`;
- (d) the quickstart digits CNN, trained briefly (4 epochs) and compiled with
  `model_compiler.compile_model` (its reference.json is built from the held-out digits); held-out digits
  drawn with replacement, then a rotation growing to 45 degrees (scipy.ndimage.rotate) plus noise growing
  to sd 0.15, rounded back to the data's 17 gray levels -> `detected_digits` (and the angle and noise
  at the alarm); also the rotation alone.
- clean streams (CLEAN_SAMPLES in all) -> `false_alarms_per_100k` (target <= 1).

Baselines in the same run, on the same streams:

- a fixed-window two-sample KS test against the same reference samples: windows of 1,000, step 50,
  Bonferroni over the 10 features, at a family alpha of 5e-4 per test (one test per 50 samples, so at
  most 1 false alarm per 100,000 samples by the union bound, like the detector's target) and at the
  textbook 0.05; each one's clean false-alarm rate is measured on the clean streams;
- alibi-detect's online Cramer-von Mises detector (`CVMDriftOnline`, ert=100,000) and Evidently's
  DataDriftPreset (windows of 1,000, step 50, the dataset-drift flag), each in its own venv
  (`make bench-drift-venvs`: .bench-venvs/alibi, .bench-venvs/evidently), run as subprocesses by
  bench/peers/*.py on .npz copies of the streams. A missing venv skips that peer (null ratio);
  --quick skips both on purpose, so `make test` needs no extra venvs.

    python bench/drift.py [--quick] [--seeds N] [--clean-samples N]

Ends with one JSON line: `false_alarms_per_100k`, `delay_ratio_vs_ks`, `delay_ratio_vs_alibi`,
`detected_single_feature`, `detected_variance`, `detected_digits`, and the medians and spreads behind them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, artifact, gemm_onnx

from edge_agent.protocol.signing import generate_keypair

FEATURES = 10
CLASSES = 3
REFERENCE_SAMPLES = 5_000
CHANGE = 2_000  # clean samples before the change point (index of the first drifted sample)
POST = 3_000  # drifted samples after it
WINDOW_CALLS = 50
KS_WINDOW, KS_STEP = 1_000, 50
KS_ALPHAS = (5e-4, 0.05)  # family alpha per test: matched to 1 per 100,000 samples, and the textbook one
ALIBI_ERT = 100_000
ALIBI_WINDOWS = (10, 50)
# alibi configures its thresholds by simulating streams: with ert=100,000 and 10 features it targets a
# 1e-6 quantile per feature, which its code refuses to estimate from fewer than 1/beta ~ 1,000,000
# simulated streams, each costing O((M + 2 * max window)^2): a reference subsample of M and small windows
# keep that to minutes on 2 cores.
ALIBI_REFERENCE = 100
ALIBI_BOOTSTRAPS = 1_010_000
ALIBI_SEEDS = 10
EVIDENTLY_WINDOW, EVIDENTLY_STEP = 1_000, 50
EVIDENTLY_SEEDS = 10  # about 0.6 s per report
DIGITS_MAX_ANGLE, DIGITS_MAX_NOISE = 45.0, 0.15  # reached at the end of the drifted part
PEER_VENVS = ROOT / ".bench-venvs"
PEERS = Path(__file__).resolve().parent / "peers"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# streams ------------------------------------------------------------------------------------------------
def gaussian_stream(kind: str, seed: int) -> np.ndarray:
    """CHANGE clean N(0, 1) samples of FEATURES features, then POST drifted ones (float32)."""
    rng = np.random.default_rng(10_000 + seed)
    x = rng.standard_normal((CHANGE + POST, FEATURES))
    drifted = x[CHANGE:]
    if kind == "mean":
        drifted += 0.5
    elif kind == "single":
        drifted[:, seed % FEATURES] += 0.5
    elif kind == "variance":
        drifted *= 1.5
    elif kind != "clean":
        raise ValueError(kind)
    return x.astype(np.float32)


def digits_stream(
    pool: np.ndarray, seed: int, post: int, max_noise: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out digits drawn with replacement; after CHANGE a rotation growing linearly to
    DIGITS_MAX_ANGLE degrees and Gaussian noise growing to ``max_noise`` (clipped to [0, 1] and rounded
    to the 17 gray levels of the data)."""
    from scipy.ndimage import rotate  # type: ignore[import-untyped]

    rng = np.random.default_rng(20_000 + seed)
    x = pool[rng.integers(0, len(pool), CHANGE + post)].copy()
    ramp = np.arange(1, post + 1) / post
    angles, noise = DIGITS_MAX_ANGLE * ramp, max_noise * ramp
    for i in range(post):
        # grid-constant: black beyond the border, interpolated; scipy's "constant" sets every pixel that
        # maps even slightly outside the 8x8 grid to 0, blanking border pixels at a 0.75 degree turn
        image = rotate(x[CHANGE + i, 0], angles[i], reshape=False, order=1, mode="grid-constant")
        if max_noise > 0:
            image = image + rng.normal(0.0, noise[i], image.shape)
        # back on the digits' 17 gray levels (k / 16), as the data were recorded: otherwise any
        # interpolation moves values off the levels, which the quantile bins (cut at levels) see at once
        x[CHANGE + i, 0] = np.round(np.clip(image, 0.0, 1.0) * 16) / 16
    return x.astype(np.float32), angles, noise


# edgefed: through the CLI -------------------------------------------------------------------------------
def save(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def cli_registered() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "from cloud_hub.cli import main; main()", "drift", "backtest", "--help"],
        capture_output=True,
        text=True,
    )
    return probe.returncode == 0


def backtest(directory: Path, data: Path, via_cli: bool) -> dict[str, Any]:
    if not via_cli:  # only while the CLI lacks the command: the same function it calls
        from cloud_hub.drift.backtest import backtest as run_backtest

        return run_backtest(directory, data, WINDOW_CALLS, 1.0)
    command = [
        sys.executable,
        "-c",
        "from cloud_hub.cli import main; main()",
        "drift",
        "backtest",
        str(directory),
        str(data),
        "--window-calls",
        str(WINDOW_CALLS),
        "--false-alarms-per-100k",
        "1",
        "--json",
    ]
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"cloud-hub drift backtest {data.name} failed: {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def split_alarms(alarms: Sequence[int | None], change: int) -> tuple[int | None, int]:
    """(delay of the first alarm at or after the change point, or None; alarms before it).
    Delay: drifted samples seen up to and including the alarm's sample."""
    early = sum(1 for a in alarms if a is not None and a < change)
    late = [a for a in alarms if a is not None and a >= change]
    return (late[0] - change + 1 if late else None), early


# the KS baseline ----------------------------------------------------------------------------------------
def ks_statistics(reference: np.ndarray, stream: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-sample KS D of every window of KS_WINDOW (step KS_STEP) against the reference, per feature:
    (window end indices, D of shape (windows, features)). Exact D: the sup of |F_w - F_r| is reached at
    a window point, from the left or the right."""
    ends = np.arange(KS_WINDOW - 1, len(stream), KS_STEP)
    n, m = KS_WINDOW, len(reference)
    stats = np.empty((len(ends), stream.shape[1]))
    rank = np.arange(n)
    for f in range(stream.shape[1]):
        ref = np.sort(reference[:, f])
        windows = np.sort(np.lib.stride_tricks.sliding_window_view(stream[:, f], n)[ends - n + 1], axis=1)
        right = np.searchsorted(ref, windows, side="right") / m
        left = np.searchsorted(ref, windows, side="left") / m
        stats[:, f] = np.maximum(((rank + 1) / n - right).max(1), (left - rank / n).max(1))
    return ends, stats


def ks_critical(alpha_family: float, m: int) -> float:
    """Critical D for a family alpha over FEATURES tests (Bonferroni), from the asymptotic Kolmogorov law."""
    from scipy.stats import kstwobign  # type: ignore[import-untyped]

    return float(kstwobign.isf(alpha_family / FEATURES) / np.sqrt(KS_WINDOW * m / (KS_WINDOW + m)))


def ks_alarms(ends: np.ndarray, stats: np.ndarray, critical: float) -> list[int]:
    """Alarm sample indices; after an alarm the test waits for a whole new window."""
    alarms: list[int] = []
    ready = 0
    for end, row in zip(ends.tolist(), stats.max(1).tolist(), strict=True):
        if end - KS_WINDOW + 1 >= ready and row > critical:
            alarms.append(end)
            ready = end + 1
    return alarms


# peers --------------------------------------------------------------------------------------------------
def run_peer(name: str, script: str, args: list[str], timeout_s: float) -> dict[str, Any] | None:
    python = PEER_VENVS / name / "bin" / "python"
    if not python.exists():
        log(f"peer {name}: skipped, no venv at {python.parent.parent} (make bench-drift-venvs builds it)")
        return None
    started = time.monotonic()
    out = subprocess.run([str(python), str(PEERS / script), *args], capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        log(f"peer {name}: failed, skipped: {out.stderr[-1500:]}")
        return None
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    log(f"peer {name}: {time.monotonic() - started:.0f} s")
    return result


# summaries ----------------------------------------------------------------------------------------------
def spread(values: Sequence[int | None]) -> dict[str, Any]:
    found = sorted(v for v in values if v is not None)
    if not found:
        return {"median": None, "p10": None, "p90": None, "min": None, "max": None, "detected": 0, "runs": len(values)}
    q = np.quantile(found, [0.1, 0.9]).tolist()
    return {
        "median": float(statistics.median(found)),
        "p10": round(q[0], 1),
        "p90": round(q[1], 1),
        "min": found[0],
        "max": found[-1],
        "detected": len(found),
        "runs": len(values),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def digits_artifact(work: Path, key: Path, epochs: int) -> tuple[Path, np.ndarray]:
    """The quickstart digits CNN compiled as tests/conftest.py::digits_artifact does; (artifact, held-out x)."""
    import digits  # type: ignore[import-not-found]

    from model_compiler import CompileOptions, compile_model

    digits.train(work, epochs=epochs)
    os.environ["DIGITS_WEIGHTS"] = str(work / "digits_cnn.pt")
    _, x_test, _, y_test = digits.digits_split()
    options = CompileOptions(name="digits-cnn", version="1.0.0", key_path=key, release=1)
    reports = compile_model(
        f"{ROOT / 'examples/quickstart/digits.py'}:trained",
        ["x86-64-generic"],
        (np.load(work / "calib.npz")["x"], None),
        (x_test, y_test),
        work / "out",
        options,
    )
    return Path(reports[0].artifact), x_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 seeds, 50,000 clean samples, no peers")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per scenario (default 40; quick 3)")
    parser.add_argument("--clean-samples", type=int, default=None, help="clean samples (default 1,000,000)")
    parser.add_argument("--digits-seeds", type=int, default=None, help="digits streams (default 5; quick 1)")
    args = parser.parse_args()
    seeds = args.seeds or (3 if args.quick else 40)
    clean_samples = args.clean_samples or (50_000 if args.quick else 1_000_000)
    digits_seeds = args.digits_seeds or (1 if args.quick else 5)
    started = time.monotonic()
    via_cli = cli_registered()
    if not via_cli:
        log(
            "NOTE: `cloud-hub drift backtest` is not registered in the CLI yet: calling "
            "cloud_hub.drift.backtest.backtest in process instead"
        )

    with tempfile.TemporaryDirectory(prefix="bench-drift-") as tmp:
        work = Path(tmp)
        key, _ = generate_keypair(work / "keys")
        reference = np.random.default_rng(12345).standard_normal((REFERENCE_SAMPLES, FEATURES)).astype(np.float32)
        gemm = artifact(
            work,
            "drift-gemm",
            lambda p: gemm_onnx(p, features=FEATURES, classes=CLASSES),
            ["batch", FEATURES],
            ["batch", CLASSES],
            key,
            reference=reference,
        )
        np.savez(work / "reference.npz", x=reference)

        # the streams, each saved as the backtest reads it (and, stacked, for the peers)
        streams: dict[str, list[np.ndarray]] = {
            k: [gaussian_stream(k, s) for s in range(seeds)] for k in ("mean", "single", "variance")
        }
        jobs: list[tuple[str, int, Path]] = []
        for kind, arrays in streams.items():
            for s, x in enumerate(arrays):
                path = work / f"{kind}-{s}.npz"
                np.savez(path, input=x)
                jobs.append((kind, s, path))
        clean_parts = max(1, clean_samples // 250_000)
        clean = [
            np.random.default_rng(30_000 + i)
            .standard_normal((clean_samples // clean_parts, FEATURES))
            .astype(np.float32)
            for i in range(clean_parts)
        ]
        for i, x in enumerate(clean):
            np.savez(work / f"clean-{i}.npz", input=x)
            jobs.append(("clean", i, work / f"clean-{i}.npz"))

        log(
            f"edgefed: {len(jobs)} backtests ({seeds} seeds x 3 scenarios, {clean_samples:,} clean samples in "
            f"{clean_parts} streams), via {'the CLI' if via_cli else 'the function'}"
        )
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=2 if via_cli else 1) as pool:
            results = list(pool.map(lambda job: backtest(gemm, job[2], via_cli), jobs))
        log(f"edgefed backtests: {time.monotonic() - t0:.0f} s")
        threshold = results[0]["threshold"]
        features = results[0]["features"]
        edgefed: dict[str, list[int | None]] = {k: [] for k in streams}
        pre_change_false = 0
        clean_false = 0
        for (kind, _, _), result in zip(jobs, results, strict=True):
            if kind == "clean":
                clean_false += len(result["alarms"])
                continue
            delay, early = split_alarms(result["alarms"], CHANGE)
            edgefed[kind].append(delay)
            pre_change_false += early
        pre_change_samples = 3 * seeds * CHANGE
        false_per_100k = clean_false / clean_samples * 100_000

        # the KS baseline: the same streams, the same reference samples
        t0 = time.monotonic()
        ks: dict[float, dict[str, list[int | None]]] = {a: {k: [] for k in streams} for a in KS_ALPHAS}
        ks_clean: dict[float, int] = dict.fromkeys(KS_ALPHAS, 0)
        ks_pre: dict[float, int] = dict.fromkeys(KS_ALPHAS, 0)
        criticals = {a: ks_critical(a, REFERENCE_SAMPLES) for a in KS_ALPHAS}
        for kind, arrays in streams.items():
            for x in arrays:
                ends, stats = ks_statistics(reference, x)
                for a in KS_ALPHAS:
                    delay, early = split_alarms(ks_alarms(ends, stats, criticals[a]), CHANGE)
                    ks[a][kind].append(delay)
                    ks_pre[a] += early
        for x in clean:
            ends, stats = ks_statistics(reference, x)
            for a in KS_ALPHAS:
                ks_clean[a] += len(ks_alarms(ends, stats, criticals[a]))
        log(f"KS baseline: {time.monotonic() - t0:.0f} s")

        # peers: alibi-detect's online CVM and Evidently's preset, each in its own venv (not in --quick)
        alibi: dict[str, Any] | None = None
        evidently: dict[str, Any] | None = None
        if args.quick:
            log(
                "peers (alibi-detect, Evidently): skipped on purpose in --quick (they need their own venvs; "
                "`make bench-drift-venvs`, then run without --quick)"
            )
        else:
            save(work / "streams.npz", {k: np.stack(v) for k, v in streams.items()})
            np.savez(work / "clean.npz", x=clean[0][:20_000])
            common_args = [
                "--reference",
                str(work / "reference.npz"),
                "--streams",
                str(work / "streams.npz"),
                "--change",
                str(CHANGE),
            ]
            alibi_args = [
                *common_args,
                "--clean",
                str(work / "clean.npz"),
                "--ert",
                str(ALIBI_ERT),
                "--window-sizes",
                ",".join(map(str, ALIBI_WINDOWS)),
                "--reference-size",
                str(ALIBI_REFERENCE),
                "--n-bootstraps",
                str(ALIBI_BOOTSTRAPS),
                "--seeds",
                str(min(seeds, ALIBI_SEEDS)),
            ]
            evidently_args = [
                *common_args,
                "--clean",
                str(work / "clean.npz"),
                "--window",
                str(EVIDENTLY_WINDOW),
                "--step",
                str(EVIDENTLY_STEP),
                "--seeds",
                str(min(seeds, EVIDENTLY_SEEDS)),
            ]
            with ThreadPoolExecutor(max_workers=2) as pool:  # side by side: each mostly waits on one core
                alibi_job = pool.submit(run_peer, "alibi", "alibi_cvm.py", alibi_args, 1800)
                evidently_job = pool.submit(run_peer, "evidently", "evidently_drift.py", evidently_args, 1800)
                alibi, evidently = alibi_job.result(), evidently_job.result()

        # (d) digits through the digits CNN's artifact
        t0 = time.monotonic()
        digits_dir, x_test = digits_artifact(work / "digits", key, epochs=4)
        digits_post = 1_000 if args.quick else 3_000
        digits_delays: dict[str, list[int | None]] = {"rotation_noise": [], "rotation_only": []}
        digits_at: dict[str, list[dict[str, float]]] = {"rotation_noise": [], "rotation_only": []}
        digits_pre = 0
        input_name = json.loads((digits_dir / "manifest.json").read_text())["inputs"][0]["name"]
        for s in range(digits_seeds):
            for variant, max_noise in (("rotation_noise", DIGITS_MAX_NOISE), ("rotation_only", 0.0)):
                x, angles, noise = digits_stream(x_test, s, digits_post, max_noise)
                path = work / f"digits-{variant}-{s}.npz"
                save(path, {input_name: x})
                result = backtest(digits_dir, path, via_cli)
                delay, early = split_alarms(result["alarms"], CHANGE)
                digits_delays[variant].append(delay)
                digits_pre += early
                if delay is not None:
                    digits_at[variant].append(
                        {"angle_deg": round(float(angles[delay - 1]), 2), "noise_sd": round(float(noise[delay - 1]), 4)}
                    )
        digits_features = result["features"]
        log(f"digits: {time.monotonic() - t0:.0f} s")

    # results --------------------------------------------------------------------------------------------
    summary = {kind: spread(v) for kind, v in edgefed.items()}
    ks_summary = {a: {kind: spread(v) for kind, v in by_kind.items()} for a, by_kind in ks.items()}
    matched = KS_ALPHAS[0]
    edge_median = summary["mean"]["median"]
    ks_median = ks_summary[matched]["mean"]["median"]

    def fraction(delays: Sequence[int | None]) -> float:
        return round(sum(d is not None for d in delays) / len(delays), 3) if delays else 0.0

    alibi_median = spread(alibi["delays"]["mean"])["median"] if alibi else None
    evidently_median = spread(evidently["delays"]["mean"])["median"] if evidently else None
    out_line = {
        "false_alarms_per_100k": round(false_per_100k, 3),
        "delay_ratio_vs_ks": ratio(edge_median, ks_median),
        "delay_ratio_vs_alibi": ratio(edge_median, alibi_median),
        "delay_ratio_vs_evidently": ratio(edge_median, evidently_median),
        "detected_single_feature": fraction(edgefed["single"]),
        "detected_variance": fraction(edgefed["variance"]),
        "detected_digits": fraction(digits_delays["rotation_noise"]),
        "detected_digits_rotation_only": fraction(digits_delays["rotation_only"]),
        "clean_samples": clean_samples,
        "clean_false_alarms": clean_false,
        "pre_change_false_alarms": pre_change_false,
        "pre_change_samples": pre_change_samples,
        "seeds": seeds,
        "threshold": threshold,
        "features": features,
        "window_calls": WINDOW_CALLS,
        "reference_samples": REFERENCE_SAMPLES,
        "change_point": CHANGE,
        "delay_mean_shift": summary["mean"],
        "delay_single_feature": summary["single"],
        "delay_variance": summary["variance"],
        "ks": {
            f"alpha_{a:g}": {
                "critical_d": round(criticals[a], 5),
                "delay_mean_shift": ks_summary[a]["mean"],
                "delay_single_feature": ks_summary[a]["single"],
                "delay_variance": ks_summary[a]["variance"],
                "clean_false_alarms": ks_clean[a],
                "pre_change_false_alarms": ks_pre[a],
                "false_alarms_per_100k": round(ks_clean[a] / clean_samples * 100_000, 3),
            }
            for a in KS_ALPHAS
        },
        "ks_alpha": matched,
        "delay_ratio_vs_ks_alpha_0.05": ratio(edge_median, ks_summary[0.05]["mean"]["median"]),
        "alibi": _peer_summary(alibi),
        "evidently": _peer_summary(evidently),
        "digits": {
            "runs": digits_seeds,
            "delay": spread(digits_delays["rotation_noise"]),
            "delay_rotation_only": spread(digits_delays["rotation_only"]),
            "at_alarm": digits_at,
            "pre_change_false_alarms": digits_pre,
            "features": digits_features,
            "max_angle_deg": DIGITS_MAX_ANGLE,
            "max_noise_sd": DIGITS_MAX_NOISE,
            "drifted_samples": digits_post,
        },
        "via_cli": via_cli,
        "seconds": round(time.monotonic() - started, 1),
        "quick": args.quick,
    }
    _report(out_line, edge_median, ks_median, alibi_median, evidently_median)
    print(json.dumps(out_line))


def _peer_summary(peer: dict[str, Any] | None) -> dict[str, Any] | None:
    if peer is None:
        return None
    return {
        **{k: v for k, v in peer.items() if k != "delays"},
        **{f"delay_{k}": spread(v) for k, v in peer["delays"].items()},
    }


def _report(
    out: dict[str, Any], edge: float | None, ks: float | None, alibi: float | None, evidently: float | None
) -> None:
    show: Callable[[float | None], str] = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    log(
        f"edgefed: {out['clean_false_alarms']} false alarms in {out['clean_samples']:,} clean samples = "
        f"{out['false_alarms_per_100k']} per 100k (target <= 1); h = {out['threshold']} over {out['features']} features"
    )
    for name, key in (
        ("mean +0.5 sd, all", "delay_mean_shift"),
        ("mean +0.5 sd, one", "delay_single_feature"),
        ("sd 1 -> 1.5", "delay_variance"),
    ):
        s = out[key]
        log(
            f"  {name}: median delay {show(s['median'])} samples (p10 {s['p10']}, p90 {s['p90']}), "
            f"detected {s['detected']}/{s['runs']}"
        )
    for label, k in out["ks"].items():
        log(
            f"KS {label}: median delay {show(k['delay_mean_shift']['median'])}, clean false alarms "
            f"{k['false_alarms_per_100k']} per 100k"
        )
    log(
        f"median delay, mean shift: edgefed {show(edge)}, KS {show(ks)}, alibi CVM {show(alibi)}, "
        f"Evidently {show(evidently)}; ratio vs KS {out['delay_ratio_vs_ks']} (target <= 0.5), "
        f"vs alibi {out['delay_ratio_vs_alibi']}, vs Evidently {out['delay_ratio_vs_evidently']}"
    )
    d = out["digits"]
    for variant, key in (("rotation_noise", "delay"), ("rotation_only", "delay_rotation_only")):
        log(
            f"digits {variant}: detected {d[key]['detected']}/{d['runs']}, median delay {show(d[key]['median'])} "
            f"samples, at {d['at_alarm'][variant][:3]}"
        )


if __name__ == "__main__":
    main()
