"""The 2-minute telemetry soak (issue 12) in the normal suite: a real agent, app, hub and Mosquitto, the
broker SIGKILLed and restarted 10 times; nothing lost, nothing counted twice, the spool within its cap."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "telemetry_soak.py"


def test_two_minute_soak_loses_nothing_and_counts_nothing_twice(tmp_path: Path) -> None:
    # output to files, not pipes: a process a failed run leaves behind must not keep the test waiting
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        code = subprocess.run([sys.executable, str(BENCH), "--minutes", "2", "--rate", "300"], stdout=out,
                              stderr=err, timeout=400).returncode  # fmt: skip
    assert code == 0, stderr.read_text()[-3000:] + stdout.read_text()[-2000:]
    figures = json.loads(stdout.read_text().strip().splitlines()[-1])
    assert figures["restarts"] == 10
    assert figures["generated"] > 10_000
    assert figures["lost"] == 0 and figures["duplicates"] == 0
    assert figures["generated"] == figures["delivered"] + figures["dropped_counted"]
    assert figures["dropped_reported"] == figures["dropped_counted"]
    assert figures["max_spooled"] <= figures["cap"] and figures["spool_resets"] == 0
