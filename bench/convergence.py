"""Convergence under faults (issue 11): agents, hub and broker SIGKILLed at random moments of deploys.

Real parts, each its own process: 20 agents (`edge-agent run`), the hub (`cloud-hub serve`, on the
broker below, always restarted on the same ports) and Mosquitto (persistence on, saved every 5 s, so a
kill loses what it has not saved). Each schedule deploys the next release of a small Gemm model to
every agent and, at random moments while it is under way (within 1.25x the median fault-free deploy
time, measured in the same run), SIGKILLs 1-3 agents and/or the hub and/or the broker (at least one
fault), restarting each 0-DOWN_S seconds later.

A schedule has converged when every device holds the new artifact active in its store (read from its
disk), the hub's deployment shows every device `active`, and no download is left in any state dir.
`converge_s` counts from the moment everything is up again; `deploy_s` from the deploy. `stuck`: not
converged STUCK_S after everything is up (the issue's bound is 30 s). The baseline: one fault-free
schedule every CLEAN_EVERY, interleaved, gives `clean_deploy_s`; `fault_vs_clean_ratio` compares.

    python bench/convergence.py [--quick] [--schedules N] [--agents N] [--seed S]

Ends with one JSON line: `schedules`, `converged`, `stuck`, `median_converge_s`, and more.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import HubProcess, MosquittoProcess, artifact, free_port, gemm_onnx

from edge_agent.enroll import enroll
from edge_agent.protocol.artifact import read_manifest
from edge_agent.protocol.signing import TrustStore, generate_keypair
from edge_agent.store import ModelStore

DOWN_S = 2.0  # each killed process stays down up to this long
STUCK_S = 60.0
CLEAN_EVERY = 10
MODEL = "gemm"


@dataclass(frozen=True)
class Fault:
    target: str  # "hub", "broker" or an agent's device id
    at_s: float
    down_s: float


class AgentProcess:
    """`edge-agent run` on its own state dir, killed with SIGKILL and started again."""

    def __init__(self, state: Path, hub: HubProcess) -> None:
        """Enrolled as a device is (a single-use token for group ``fleet``), then started."""
        self.state = state
        token = hub.admin.request("POST", "/v1/enroll-tokens", json.dumps({"groups": ["fleet"]}).encode())["token"]
        enroll(f"http://127.0.0.1:{hub.admin_port}", token, state.name, "x86-64-generic", state)
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with open(self.state / "agent.log", "ab") as log:
            command = [sys.executable, "-c", "from edge_agent.cli import main; main()", "run", "--state-dir",
                       str(self.state), "--log-level", "WARNING"]  # fmt: skip
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def holds(self, artifact_id: str) -> bool:
        """The artifact is active in its store and no download is left behind."""
        active = ModelStore(self.state / "models").active(MODEL)
        downloads = self.state / "downloads"
        return active is not None and active.artifact_id == artifact_id and not any(
            downloads.iterdir() if downloads.is_dir() else ()
        )


class Fleet:
    """Mosquitto, the hub and the agents, each one killable and restartable by name."""

    def __init__(self, work: Path, agents: int) -> None:
        self.work = work
        self.key, self.pub = generate_keypair(work / "keys")
        (work / "broker").mkdir()
        (work / "artifacts").mkdir()
        self.broker = MosquittoProcess(work / "broker")
        self.hub_ports = {"grpc_port": free_port(), "admin_port": free_port()}
        self.hub = self._start_hub()
        self.agents = {f"dev-{i:02d}": AgentProcess(work / f"dev-{i:02d}", self.hub) for i in range(agents)}

    def _start_hub(self) -> HubProcess:
        return HubProcess(self.work, self.pub, broker=self.broker.url, **self.hub_ports)

    def kill(self, target: str) -> None:
        if target == "hub":
            self.hub.process.kill()
            self.hub.process.wait()
        elif target == "broker":
            self.broker.process.kill()
            self.broker.process.wait()
        else:
            self.agents[target].kill()

    def start(self, target: str) -> None:
        if target == "hub":
            self.hub = self._start_hub()
        elif target == "broker":
            self.broker = MosquittoProcess(self.work / "broker", port=self.broker.port)
        else:
            self.agents[target].start()

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        return self.hub.admin.request(method, path, body)

    def all_online(self) -> bool:
        try:
            online = {d["device_id"] for d in self.admin("GET", "/v1/devices") if d["status"] == "online"}
        except Exception:
            return False
        return online >= set(self.agents)

    def hub_says_active(self, deployment_id: str) -> bool:
        try:
            states = self.admin("GET", f"/v1/deployments/{deployment_id}")["states"]
        except Exception:  # the hub is restarting
            return False
        return all(s["state"] == "active" for s in states.values())

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.kill()
        self.hub.stop()
        self.broker.stop()


def random_faults(rng: random.Random, devices: list[str], window_s: float) -> list[Fault]:
    """1-3 agents and/or the hub and/or the broker, each at a random moment of ``window_s``; at least one."""
    targets: list[str] = []
    while not targets:
        if rng.random() < 0.6:
            targets += rng.sample(devices, rng.randint(1, min(3, len(devices))))
        targets += [t for t in ("hub", "broker") if rng.random() < 0.4]
    return [Fault(t, rng.uniform(0, window_s), rng.uniform(0, DOWN_S)) for t in targets]


def run_faults(fleet: Fleet, faults: list[Fault], began: float) -> None:
    """Each fault in its own thread (kill at ``at_s``, start again ``down_s`` later); returns when all
    killed processes run again."""

    def strike(fault: Fault) -> None:
        time.sleep(max(0.0, began + fault.at_s - time.monotonic()))
        fleet.kill(fault.target)
        time.sleep(fault.down_s)
        fleet.start(fault.target)

    threads = [threading.Thread(target=strike, args=(f,)) for f in faults]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def schedule(fleet: Fleet, release: int, faults: list[Fault]) -> dict[str, Any]:
    """Deploy release ``release`` under ``faults``; the outcome and its timings."""
    directory = artifact(fleet.work / "artifacts", MODEL, gemm_onnx, ["batch", 32], ["batch", 30], fleet.key,
                         dirname=f"r{release}", version=f"1.{release}.0", release=release)  # fmt: skip
    fleet.hub.admin.add_artifact(directory)
    artifact_id = read_manifest(directory, TrustStore.from_dir(fleet.pub.parent)).artifact_id
    began = time.monotonic()
    deployment = fleet.hub.admin.deploy(MODEL, f"1.{release}.0", "group:fleet")["deployment_id"]
    run_faults(fleet, faults, began)
    up = time.monotonic()
    while time.monotonic() - up < STUCK_S:
        if all(a.holds(artifact_id) for a in fleet.agents.values()) and fleet.hub_says_active(deployment):
            done = time.monotonic()
            return {"converged": True, "converge_s": done - up, "deploy_s": done - began}
        time.sleep(0.1)
    lagging = [d for d, a in fleet.agents.items() if not a.holds(artifact_id)]
    return {"converged": False, "lagging": lagging, "hub_active": fleet.hub_says_active(deployment)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 schedules on 4 agents (the test suite's run)")
    parser.add_argument("--schedules", type=int, default=200, help="fault schedules to run")
    parser.add_argument("--agents", type=int, default=20, help="agent processes")
    parser.add_argument("--seed", type=int, default=11, help="seed of the fault schedules")
    args = parser.parse_args()
    schedules, agents = (4, 4) if args.quick else (args.schedules, args.agents)
    rng = random.Random(args.seed)
    results, clean = [], []
    with tempfile.TemporaryDirectory() as tmp:
        fleet = Fleet(Path(tmp), agents)
        try:
            deadline = time.monotonic() + 60
            while not fleet.all_online():
                if time.monotonic() > deadline:
                    raise RuntimeError("the hub did not hear from every agent within 60 s")
                time.sleep(0.2)
            release = 0
            while len(results) < schedules:
                release += 1
                window_s = 1.25 * statistics.median(c["deploy_s"] for c in clean) if clean else 1.0
                faults = [] if release % CLEAN_EVERY == 1 else random_faults(rng, sorted(fleet.agents), window_s)
                outcome = schedule(fleet, release, faults)
                (clean if not faults else results).append(outcome)
                what = ", ".join(f"{f.target}@{f.at_s:.1f}s/{f.down_s:.1f}s" for f in faults) or "no fault"
                timing = f"converged in {outcome['converge_s']:.1f} s" if outcome["converged"] else f"STUCK {outcome}"
                print(f"release {release:3d}: {what}: {timing}", file=sys.stderr, flush=True)
        finally:
            fleet.stop()
    print_summary(results, clean, agents, args.quick)


def print_summary(results: list[dict[str, Any]], clean: list[dict[str, Any]], agents: int, quick: bool) -> None:
    converged = [r for r in results if r["converged"]]
    times = sorted(r["converge_s"] for r in converged) or [float("nan")]
    deploys = [r["deploy_s"] for r in converged] or [float("nan")]
    clean_deploys = [r["deploy_s"] for r in clean if r["converged"]] or [float("nan")]
    figures = {
        "schedules": len(results),
        "agents": agents,
        "converged": len(converged),
        "stuck": len(results) - len(converged),
        "median_converge_s": round(statistics.median(times), 2),
        "p90_converge_s": round(times[int(0.9 * (len(times) - 1))], 2),
        "max_converge_s": round(times[-1], 2),
        "median_deploy_s": round(statistics.median(deploys), 2),
        "clean_deploy_s": round(statistics.median(clean_deploys), 2),
        "fault_vs_clean_ratio": round(statistics.median(deploys) / statistics.median(clean_deploys), 2),
        "clean_stuck": sum(not r["converged"] for r in clean),
        "quick": quick,
    }
    print(f"{figures['converged']}/{figures['schedules']} schedules converged, {figures['stuck']} stuck; "
          f"after everything is up: median {figures['median_converge_s']} s, p90 {figures['p90_converge_s']} s, "
          f"max {figures['max_converge_s']} s; deploy under faults {figures['median_deploy_s']} s vs "
          f"{figures['clean_deploy_s']} s without ({figures['fault_vs_clean_ratio']}x)", file=sys.stderr)  # fmt: skip
    print(json.dumps(figures))
    if figures["stuck"] or figures["clean_stuck"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
