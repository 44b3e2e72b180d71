"""Every bench script runs in --quick mode and ends with one JSON line of figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REQUIRED_KEYS = {
    "sdk_overhead": ("cnn_added_us", "cnn_ratio", "gemm_added_us"),
    "cloud": (
        "sdk_vs_tritonclient_ratio",
        "vs_kserve_rps_ratio",
        "vs_kserve_latency_ratio",
        "batching_throughput_ratio",
    ),
    "failover": ("local_fail_to_cloud_p99_ms", "cloud_dead_overrun_p99_ms", "breaker_recovery_speedup"),
    "fanout": ("agents", "seconds", "hub_egress_ratio", "speedup_vs_unicast", "resume_retransfer_fraction"),
    "fleet": ("agents", "deploy_seconds", "state_exact"),
    "rollout": ("agents", "bad_exposed_fraction", "rollback_seconds", "good_rollout_seconds", "state_exact"),
    "convergence": ("schedules", "converged", "stuck", "median_converge_s"),
    "drift": (
        "false_alarms_per_100k",
        "delay_ratio_vs_ks",
        "delay_ratio_vs_alibi",
        "detected_single_feature",
        "detected_variance",
        "detected_digits",
    ),
    "telemetry_soak": ("restarts", "generated", "delivered", "dropped_counted", "duplicates", "lost"),
    "telemetry": ("records_per_s_ratio", "lost", "hub_cpu_cores"),
    "compiler": ("int8_size_ratio", "int8_latency_ratio", "top1_agreement", "minilm_cosine", "minilm_speedup"),
    "dashboard": ("fleet_page_ms_p95", "fleet_api_ms_p95", "devices"),
    "replicas": ("replicas", "records_per_s", "cpu_ms_per_1k_records", "duplicates", "lost"),
}
MUST_BE_ZERO = {"replicas": ("duplicates", "lost")}  # what a smoke run must already get right
BENCHES = sorted(p for p in (Path(__file__).resolve().parents[1] / "bench").glob("*.py") if "--quick" in p.read_text())


@pytest.mark.parametrize("script", BENCHES, ids=lambda p: p.stem)
def test_bench_quick_mode(script: Path) -> None:
    out = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["quick"] is True
    assert all(v > 0 for k, v in figures.items() if k.endswith(("raw_us", "sdk_us")))
    assert set(REQUIRED_KEYS.get(script.stem, ())) <= set(figures)
    zero = MUST_BE_ZERO.get(script.stem, ())
    assert {k: figures[k] for k in zero} == dict.fromkeys(zero, 0)


def test_every_bench_an_issue_names_exists() -> None:
    assert set(REQUIRED_KEYS) <= {p.stem for p in BENCHES}
