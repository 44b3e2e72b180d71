"""Every bench script runs in --quick mode and ends with one JSON line of figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REQUIRED_KEYS = {"sdk_overhead": ("cnn_added_us", "cnn_ratio", "gemm_added_us")}
BENCHES = sorted((Path(__file__).resolve().parents[1] / "bench").glob("*.py"))


@pytest.mark.parametrize("script", BENCHES, ids=lambda p: p.stem)
def test_bench_quick_mode(script: Path) -> None:
    out = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["quick"] is True
    assert all(v > 0 for k, v in figures.items() if k.endswith(("raw_us", "sdk_us")))
    assert set(REQUIRED_KEYS.get(script.stem, ())) <= set(figures)
