"""Telemetry soak (issue 12): an app calling the SDK without pause while the broker is SIGKILLed and
restarted, again and again; afterwards every call the app made is either stored by the hub or counted
as dropped by the spool — never lost, never counted twice.

Real parts, each its own process: Mosquitto (persistence on, saved every 5 s, so a kill loses what it
had not saved), the hub (`cloud-hub serve` on that broker), one enrolled agent (`edge-agent run`,
telemetry every ``INTERVAL_S``) with a small Gemm artifact installed by `edge-agent install`, and an
app process calling `EdgeClient.infer` at ``--rate`` calls/s (paced, so the two cores keep up) that
counts its calls. The broker is killed ``--restarts`` times at evenly spread moments (jittered) and
comes back 0.5-3 s later on the same port. At the end the app stops (closing its client flushes its
queue), the agent drains the spool, and:

* ``generated``: the calls the app made (counted by the app);
* ``delivered``: the calls in the windows the hub stored (`GET /v1/telemetry`);
* ``dropped_counted``: the spool's ``dropped`` counter (queue overflow, full spool, failed writes);
  ``dropped_reported`` the drops the hub received, which must equal it;
* ``duplicates``: calls in rows whose (device, epoch, seq) the hub holds twice, plus any surplus of
  delivered + dropped over generated (calls counted twice under different seqs);
* ``lost`` = generated - delivered - dropped_counted;
* ``max_spooled`` (calls waiting in the spool, sampled every 0.25 s) vs ``cap``, and
  ``max_unacked`` (those plus the batch in flight).

    python bench/telemetry_soak.py [--quick] [--minutes M] [--restarts N] [--rate R] [--cap N] [--policy P]

Ends with one JSON line: ``restarts``, ``generated``, ``delivered``, ``dropped_counted``, ``duplicates``,
``lost``, ``max_spooled``, ``cap``, ``quick``. Exits 1 when anything was lost, counted twice or above the cap.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import HubProcess, MosquittoProcess, artifact, gemm_onnx

from edge_agent.enroll import enroll
from edge_agent.protocol.signing import generate_keypair
from edge_agent.spool_schema import DEFAULT_MAX_CALLS, FULL_POLICIES

INTERVAL_S = 0.5  # the agent's telemetry interval (default 5 s: shorter, so the run sees many batches)
DOWN_S = (0.5, 3.0)
DRAIN_S = 120.0
DEVICE = "soak-dev"


def run_app(state: Path, rate: float, out: Path) -> None:
    """The app process: `EdgeClient.infer` at ``rate`` calls/s until SIGTERM; then close the client
    (its recorder flushes) and write how many calls it made."""
    import numpy as np

    from edge_agent.client import EdgeClient
    from edge_agent.protocol.atomic import atomic_write_bytes

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    client = EdgeClient(state, cloud=False)
    x = np.random.default_rng(0).random((1, 32), np.float32)
    generated, failed, began = 0, 0, time.monotonic()
    while not stop.is_set():
        try:
            client.infer("gemm", {"input": x})
        except Exception:  # a failed call is recorded too (ok = False): it still counts
            failed += 1
        generated += 1
        ahead = began + generated / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    client.close()
    atomic_write_bytes(out, json.dumps({"generated": generated, "failed": failed}).encode())


class SpoolSampler(threading.Thread):
    """Reads the spool's size every 0.25 s (read-only, beside the app and the agent)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.stop = path, threading.Event()
        self.max_spooled = self.max_unacked = self.samples = 0

    def read(self) -> tuple[int, int, int]:
        """(calls waiting, calls in the outbox, drops not yet reported)."""
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        try:
            waiting = int(db.execute("SELECT COALESCE(SUM(n), 0) FROM calls").fetchone()[0])
            outbox = sum(
                sum(int(w["count"]) for w in json.loads(p)["windows"])
                for (p,) in db.execute("SELECT payload FROM outbox")
            )
            counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
            return waiting, outbox, int(counters.get("dropped", 0)) - int(counters.get("dropped_reported", 0))
        finally:
            db.close()

    def run(self) -> None:
        while not self.stop.wait(0.25):
            try:
                waiting, outbox, _ = self.read()
            except sqlite3.Error:
                continue  # not made yet, or busy
            self.samples += 1
            self.max_spooled = max(self.max_spooled, waiting)
            self.max_unacked = max(self.max_unacked, waiting + outbox)


def start_agent(state: Path) -> subprocess.Popen[bytes]:
    with open(state / "agent.log", "ab") as log:
        command = [sys.executable, "-c", "from edge_agent.cli import main; main()", "run", "--state-dir", str(state),
                   "--log-level", "WARNING"]  # fmt: skip
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def setup_device(work: Path, hub: HubProcess, key: Path, cap: int, policy: str) -> Path:
    """Enroll the device, set its telemetry interval and spool cap/policy, install the Gemm artifact."""
    state = work / DEVICE
    token = hub.admin.request("POST", "/v1/enroll-tokens", json.dumps({"groups": ["soak"]}).encode())["token"]
    config = enroll(f"http://127.0.0.1:{hub.admin_port}", token, DEVICE, "x86-64-generic", state)
    dataclasses.replace(config, telemetry_interval_s=INTERVAL_S, spool_max_calls=cap, spool_full=policy).save(state)
    (work / "artifacts").mkdir()
    directory = artifact(work / "artifacts", "gemm", gemm_onnx, ["batch", 32], ["batch", 30], key, reference=True)
    subprocess.run([sys.executable, "-c", "from edge_agent.cli import main; main()", "install", str(directory),
                    "--state-dir", str(state)], check=True, capture_output=True)  # fmt: skip
    return state


def kill_broker_repeatedly(broker: list[MosquittoProcess], work: Path, restarts: int, seconds: float,
                           rng: random.Random) -> int:  # fmt: skip
    """SIGKILL the broker ``restarts`` times spread over ``seconds``; each time it is back 0.5-3 s later."""
    began, done = time.monotonic(), 0
    slot = seconds / max(restarts, 1)
    for i in range(restarts):
        at = began + slot * i + rng.uniform(0.2, 0.6) * slot
        time.sleep(max(0.0, at - time.monotonic()))
        broker[0].process.kill()
        broker[0].process.wait()
        time.sleep(min(rng.uniform(*DOWN_S), 0.8 * slot))
        broker[0] = MosquittoProcess(work / "broker", port=broker[0].port)
        done += 1
    time.sleep(max(0.0, began + seconds - time.monotonic()))
    return done


def drain(sampler: SpoolSampler, agent: subprocess.Popen[bytes], timeout_s: float) -> float:
    """Wait until the spool holds nothing unsent (calls, outbox, unreported drops); the seconds it took."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        if agent.poll() is not None:
            log = (sampler.path.parent / "agent.log").read_text()[-3000:]
            raise RuntimeError(f"the agent died (exit {agent.returncode}) with {sampler.read()} unsent: {log}")
        try:
            if sampler.read() == (0, 0, 0):
                return time.monotonic() - began
        except sqlite3.Error:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the spool did not drain within {timeout_s:.0f} s: {sampler.read()}")


def hub_figures(hub: HubProcess) -> dict[str, int]:
    """Calls delivered, drops reported and calls counted twice, from the hub's stored batches."""
    rows: list[dict[str, Any]] = hub.admin.request("GET", f"/v1/telemetry?device={DEVICE}")
    seen: set[tuple[str, str, int]] = set()
    delivered = reported = twice = 0
    for row in rows:
        calls = sum(int(w["count"]) for w in row["windows"])
        key = (row["device_id"], row["epoch"], int(row["seq"]))
        if key in seen:
            twice += calls
            continue
        seen.add(key)
        delivered += calls
        reported += int(row["dropped"])
    return {"delivered": delivered, "dropped_reported": reported, "duplicate_rows_calls": twice, "batches": len(seen)}


def soak(args: argparse.Namespace, minutes: float, restarts: int) -> dict[str, Any]:
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        key, pub = generate_keypair(work / "keys")
        (work / "broker").mkdir()
        broker = [MosquittoProcess(work / "broker")]
        try:
            hub = HubProcess(work, pub, broker=broker[0].url)
        except BaseException:
            broker[0].stop()
            raise
        agent: subprocess.Popen[bytes] | None = None
        app: subprocess.Popen[bytes] | None = None
        try:
            state = setup_device(work, hub, key, args.cap, args.policy)
            agent = start_agent(state)
            sampler = SpoolSampler(state / "telemetry.db")
            sampler.start()
            out = work / "app.json"
            with open(work / "app.log", "wb") as log:
                app = subprocess.Popen([sys.executable, __file__, "--app", str(state), "--rate", str(args.rate),
                                        "--out", str(out)], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
            began = time.monotonic()
            done = kill_broker_repeatedly(broker, work, restarts, minutes * 60, rng)
            app.send_signal(signal.SIGTERM)
            app.wait(timeout=60)
            ran_s = time.monotonic() - began
            if not out.exists():
                raise RuntimeError(f"the app did not report: {(work / 'app.log').read_text()[-2000:]}")
            app_figures = json.loads(out.read_text())
            drain_s = drain(sampler, agent, DRAIN_S)
            sampler.stop.set()
            sampler.join()
            counters = dict(sqlite3.connect(state / "telemetry.db").execute("SELECT name, value FROM counters"))
            at_hub = hub_figures(hub)
        finally:
            for process in (app, agent):
                if process is not None and process.poll() is None:
                    process.kill()
                    process.wait()
            hub.stop()
            broker[0].stop()
    generated, dropped = int(app_figures["generated"]), int(counters.get("dropped", 0))
    delivered = at_hub["delivered"]
    surplus = max(0, delivered + dropped - generated)
    return {
        "restarts": done,
        "minutes": round(ran_s / 60, 2),
        "generated": generated,
        "delivered": delivered,
        "dropped_counted": dropped,
        "dropped_reported": at_hub["dropped_reported"],
        "duplicates": at_hub["duplicate_rows_calls"] + surplus,
        "lost": generated - delivered - dropped,
        "failed_calls": int(app_figures["failed"]),
        "batches": at_hub["batches"],
        "max_spooled": sampler.max_spooled,
        "max_unacked": sampler.max_unacked,
        "cap": args.cap,
        "policy": args.policy,
        "spool_samples": sampler.samples,
        "spool_resets": int(counters.get("spool_resets", 0)),
        "drain_s": round(drain_s, 2),
        "calls_per_s": round(generated / ran_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="15 s, 3 broker restarts (the bench smoke test)")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the app calls (default 10)")
    parser.add_argument("--restarts", type=int, help="broker kills (default 5 a minute: 50 in 10 minutes)")
    parser.add_argument("--rate", type=float, default=500.0, help="the app's calls a second")
    parser.add_argument("--cap", type=int, default=DEFAULT_MAX_CALLS, help="the spool's cap (agent.json)")
    parser.add_argument("--policy", choices=FULL_POLICIES, default="drop_oldest", help="the spool's full policy")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--app", type=Path, help=argparse.SUPPRESS)  # run as the app process on this state dir
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.app:
        run_app(args.app, args.rate, args.out)
        return
    minutes = 0.25 if args.quick else args.minutes
    restarts = 3 if args.quick else (args.restarts if args.restarts is not None else round(5 * minutes))
    figures = {**soak(args, minutes, restarts), "quick": args.quick}
    print(f"{figures['restarts']} broker kills in {figures['minutes']} min: {figures['generated']} calls made, "
          f"{figures['delivered']} stored by the hub, {figures['dropped_counted']} counted as dropped, "
          f"{figures['lost']} lost, {figures['duplicates']} counted twice; spool at most {figures['max_spooled']} "
          f"calls (cap {figures['cap']}), drained in {figures['drain_s']} s", file=sys.stderr)  # fmt: skip
    print(json.dumps(figures))
    bad = figures["lost"] or figures["duplicates"] or figures["max_spooled"] > figures["cap"] or figures["spool_resets"]
    if bad or figures["dropped_reported"] != figures["dropped_counted"]:
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
