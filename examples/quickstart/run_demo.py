"""`make demo`: the whole edgefed loop on one machine, told as a short story.

Trains a digits CNN, compiles and signs it for this machine's profile, starts a hub and an agent as
separate processes (free ports, embedded broker), shows a cloud-routed call, deploys over MQTT, runs
local inferences through the SDK, shows the telemetry the hub stored, and shuts everything down.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE))


def say(text: str) -> None:
    print(f"\n\033[1m▶ {text}\033[0m", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: str, cwd: Path) -> Any:
    out = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=cwd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout) if "--json" in args else out.stdout


def start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=cwd, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def wait_for(what: str, check: Any, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def main() -> int:
    started = time.monotonic()
    work = Path(os.environ.get("DEMO_WORKDIR", HERE.parents[1] / "demo-work")).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ["DIGITS_WEIGHTS"] = str(work / "digits_cnn.pt")
    import digits

    say("1. Train a 284k-parameter CNN on scikit-learn's digits (CPU, seconds)")
    accuracy = digits.train(work)
    print(f"   held-out accuracy {accuracy:.3f}")

    from device_profiles import load_profiles
    from device_profiles.detect import detect_profile

    detected = detect_profile(load_profiles())
    profile = detected.profile.id if detected else "x86-64-generic"
    say(f"2. Compile, quantize, gate and sign it for this machine's profile: {profile}")
    cli("model-compiler", "keygen", "--out", "keys", cwd=work)
    report = cli(
        "model-compiler",
        "compile",
        f"{HERE / 'digits.py'}:trained",
        "--profile",
        profile,
        "--calib",
        "calib.npz",
        "--val",
        "val.npz",
        "--out",
        "artifacts",
        "--name",
        "digits-cnn",
        "--version",
        "1.0.0",
        "--json",
        cwd=work,
    )[0]
    for v in report["variants"]:
        print(
            f"   {v['kind']:>38}: {v['size'] / 1024:6.0f} KiB  top-1 agreement {v['value']:.4f}  "
            f"{v['latency_ms']:.3f} ms/call"
        )
    print(f"   chosen: {report['reason']}")

    broker, grpc_port, admin = free_port(), free_port(), free_port()
    say(f"3. Start the hub (embedded MQTT broker :{broker}, OIP gRPC :{grpc_port}, admin API :{admin})")
    hub = start(
        [
            "cloud-hub",
            "serve",
            "--state-dir",
            "hub",
            "--broker-port",
            str(broker),
            "--grpc-port",
            str(grpc_port),
            "--admin-port",
            str(admin),
            "--trust",
            "keys/signing.pub",
        ],
        work,
        work / "hub.log",
    )
    agent = None
    try:
        wait_for("the hub", lambda: "ready" in (work / "hub.log").read_text())
        hub_args = ["--hub", f"http://127.0.0.1:{admin}", "--state-dir", "hub"]
        cli("cloud-hub", "models", "add", report["artifact"], *hub_args, cwd=work)
        print(f"   registered artifact {report['artifact_id'][:16]}… (signature and hashes verified by the hub)")

        say("4. Set up a device and start its agent (a separate process)")
        cli(
            "edge-agent",
            "init",
            "--state-dir",
            "device",
            "--device-id",
            "demo-device-1",
            "--profile",
            profile,
            "--trust",
            "keys/signing.pub",
            "--broker",
            f"mqtt://127.0.0.1:{broker}",
            "--cloud",
            f"grpc://127.0.0.1:{grpc_port}",
            cwd=work,
        )
        config = json.loads((work / "device" / "agent.json").read_text())
        config["telemetry_interval_s"] = 1.0
        (work / "device" / "agent.json").write_text(json.dumps(config))
        agent = start(["edge-agent", "run", "--state-dir", "device"], work, work / "agent.log")
        wait_for(
            "the device to report",
            lambda: [
                d for d in cli("cloud-hub", "devices", "list", "--json", *hub_args, cwd=work) if d["status"] == "online"
            ],
        )
        print("   hub sees demo-device-1 online")

        from edge_agent import EdgeClient

        _, x_test, _, y_test = digits.digits_split()
        with EdgeClient(work / "device") as client:
            say("5. The app asks before anything is deployed: the SDK falls back to the cloud (gRPC, OIP)")
            result = client.infer("digits-cnn", {"input": x_test[:1]})
            print(
                f"   route={result.route} ({result.reason}), version {result.version}, "
                f"predicted {int(result.outputs['output'].argmax())}, true {y_test[0]}, {result.latency_ms:.2f} ms"
            )

            say("6. Deploy digits-cnn@1.0.0 to the device over MQTT (desired state, chunked artifact)")
            cli("cloud-hub", "deploy", "digits-cnn@1.0.0", "--to", "device:demo-device-1", *hub_args, cwd=work)
            wait_for(
                "the agent to activate the model",
                lambda: any(m.active_version == "1.0.0" for m in client.models()),
            )
            print("   agent fetched, verified, installed, health-checked and activated it")

            say("7. The app runs 300 inferences through the SDK: local route")
            results = [client.infer("digits-cnn", {"input": x_test[i : i + 1]}) for i in range(300)]
            predictions = np.array([int(r.outputs["output"].argmax()) for r in results])
            latencies = sorted(r.latency_ms for r in results)
            accuracy = np.mean(predictions == y_test[:300])
            print(
                f"   routes: {sorted({r.route for r in results})}, accuracy {accuracy:.3f}, "
                f"median {latencies[150]:.3f} ms, p99 {latencies[296]:.3f} ms"
            )

        say("8. Telemetry the hub received (aggregated windows, acknowledged by sequence)")

        def windows() -> list[dict[str, Any]]:
            rows = cli("cloud-hub", "telemetry", "--json", *hub_args, cwd=work)
            return rows if sum(r["calls"] for r in rows if r["route"] == "local") >= 300 else []

        for row in wait_for("telemetry", windows, timeout_s=30):
            print(
                f"   seq {row['seq']}: {row['model']}@{row['version']} {row['route']:>5}: {row['calls']} calls, "
                f"{row['errors']} errors, mean {row['mean ms']} ms"
            )
    finally:
        say("9. Shut down: agent and hub stop on SIGTERM")
        for process in (agent, hub):
            if process is not None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=20)
                print(f"   {process.args[0].rsplit('/', 1)[-1]} exited with {process.returncode}")  # type: ignore[index]
    print(f"\nDemo finished in {time.monotonic() - started:.1f} s. Logs and state: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
