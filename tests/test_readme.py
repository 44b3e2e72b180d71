"""The README's ten-minute tour runs as written: every code block of that section, in order, in a
temporary directory, with the project's console scripts on PATH.

Two things differ from a person at a terminal, and only these: the fixed ports of the tour (1883, 8001,
8080) become free ones (``cloud-hub serve`` gets ``--broker-port/--grpc-port/--admin-port`` and the
operator commands ``EDGEFED_HUB_URL``), and after a command that starts a daemon in the background the
test waits for it as a person would (the hub's admin port answers; the hub has heard from the agent).
The telemetry command is repeated until the agent's first upload arrives (it uploads every 5 s).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, free_port, wait_for

BLOCK = re.compile(r"```(bash|python)\n(.*?)```", re.S)


def tour_blocks() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Ten-minute tour", 1)[1].split("\n## ", 1)[0]
    return BLOCK.findall(section)


def commands(block: str) -> list[str]:
    """Shell commands of a bash block: continuation lines joined, blank lines dropped."""
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


class Tour:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.ports = {"1883": free_port(), "8001": free_port(), "8080": free_port()}
        bin_dir = str(Path(sys.executable).parent)
        self.env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
                    "EDGEFED_HUB_URL": f"http://127.0.0.1:{self.ports['8080']}"}  # fmt: skip
        self.env.pop("EDGEFED_STATE_DIR", None)
        self.background: list[subprocess.Popen[bytes]] = []

    def adapt(self, command: str) -> str:
        for fixed, port in self.ports.items():
            command = command.replace(f":{fixed}", f":{port}")
        if command.startswith("cloud-hub serve"):
            command = command.replace("cloud-hub serve", "cloud-hub serve --broker-port {} --grpc-port {} "
                                      "--admin-port {}".format(*self.ports.values()), 1)  # fmt: skip
        return command

    def run(self, command: str) -> str:
        command = self.adapt(command)
        if re.search(r"&\s*(#.*)?$", command):
            self.start(re.sub(r"&\s*(#.*)?$", "", command))
            return ""
        done = subprocess.run(["bash", "-c", command], cwd=self.work, env=self.env, capture_output=True,
                              timeout=300)  # fmt: skip
        output = done.stdout.decode() + done.stderr.decode()
        assert done.returncode == 0, f"{command!r} exited {done.returncode}:\n{output}"
        return output

    def start(self, command: str) -> None:
        log = open(self.work / f"daemon-{len(self.background)}.log", "wb")  # noqa: SIM115 (kept open for the daemon)
        self.background.append(subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=self.work, env=self.env,
                                                stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
        if command.startswith("cloud-hub serve"):
            wait_for("the hub's admin API", lambda: self._answers(["cloud-hub", "status", "--state-dir", "hub"]), 60)
        if command.startswith("edge-agent run"):
            wait_for("the hub to know the agent", self._device_known, 60)

    def _answers(self, argv: list[str]) -> bool:
        self._check_daemons()
        return subprocess.run(argv, cwd=self.work, env=self.env, capture_output=True).returncode == 0

    def _device_known(self) -> bool:
        self._check_daemons()
        listed = subprocess.run(["cloud-hub", "devices", "list", "--state-dir", "hub", "--json"], cwd=self.work,
                                env=self.env, capture_output=True)  # fmt: skip
        return listed.returncode == 0 and any(d.get("profile") for d in json.loads(listed.stdout or b"[]"))

    def _check_daemons(self) -> None:
        for index, process in enumerate(self.background):
            if process.poll() is not None:
                log = (self.work / f"daemon-{index}.log").read_text()
                raise AssertionError(f"{process.args} exited {process.returncode}:\n{log}")

    def python(self, code: str) -> str:
        done = subprocess.run([sys.executable, "-c", code], cwd=self.work, env=self.env, capture_output=True,
                              timeout=120)  # fmt: skip
        output = done.stdout.decode() + done.stderr.decode()
        assert done.returncode == 0, f"the README's Python snippet failed:\n{output}"
        return output

    def stop(self) -> None:
        for process in self.background:
            process.send_signal(signal.SIGTERM)
        for process in self.background:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def tour(tmp_path: Path) -> Iterator[Tour]:
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    running = Tour(tmp_path)
    yield running
    running.stop()


def test_the_readme_tour_runs_as_written(tour: Tour) -> None:
    blocks = tour_blocks()
    assert [kind for kind, _ in blocks] == ["bash", "python", "bash"], "the tour's shape changed: update this test"
    outputs = []
    for kind, block in blocks[:2]:
        if kind == "python":
            outputs.append(tour.python(block))
        else:
            outputs += [tour.run(command) for command in commands(block)]
    snippet = outputs[-1]
    assert re.search(r"\[\d \d \d \d\] local 1\.0\.0 [\d.]+ ms", snippet), snippet
    assert "Interface(inputs=(TensorSpec(name='input'" in snippet
    telemetry, alerts = commands(blocks[2][1])
    shown = wait_for("the agent's telemetry at the hub", lambda: (out := tour.run(telemetry)) and
                     "digits-cnn" in out and out, timeout_s=60)  # fmt: skip
    assert re.search(r"dev-1\W+[0-9a-f]+\W+\d+\W+digits-cnn\W+1\.0\.0\W+local\W+1\W+0\W", shown), shown
    assert "…" not in shown  # a pipe gets the whole table
    rows = json.loads(tour.run(f"{telemetry} --json"))
    assert isinstance(rows[0]["mean ms"], float) and rows[0]["over budget"] == 0
    assert "digits-cnn" not in tour.run(alerts)  # the validation set is what the reference was made of
    status = json.loads(tour.run("edge-agent status --state-dir dev"))
    assert status["broker"]["connected"] and status["active"] == {"digits-cnn": "1.0.0"}
