"""A KServe Python ``ModelServer`` in its own process and venv, on free ports: the cloud peer of
tests/test_kserve_cloud.py and bench/cloud.py.

KServe pins dependencies that clash with edgefed's (its own FastAPI, grpcio and protobuf ranges), so it
lives in ``.kserve-venv``, built by `make .kserve-venv/.installed` (which `make test` and `make
bench-venv` run) from the pins in tests/kserve_requirements.txt. The server is tests/kserve_server.py.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import IO

import grpc
from common import free_port

from edge_agent.protocol.oip import InferenceStub, pb

ROOT = Path(__file__).resolve().parents[1]
KSERVE_VENV = ROOT / ".kserve-venv"
KSERVE_PYTHON = KSERVE_VENV / "bin" / "python"
KSERVE_STAMP = KSERVE_VENV / ".installed"
MAKE_TARGET = ".kserve-venv/.installed"
SERVER = ROOT / "tests" / "kserve_server.py"


def kserve_installed() -> bool:
    """Whether the KServe venv was built completely (its stamp is written after the install)."""
    return KSERVE_STAMP.exists() and KSERVE_PYTHON.exists()


def missing_message() -> str:
    return (f"KServe is not installed in {KSERVE_VENV} (it needs a venv of its own): run `make {MAKE_TARGET}` "
            "(`make test` builds it too)")  # fmt: skip


class KServeProcess:
    """`tests/kserve_server.py` serving ``models`` (name → an ``.onnx`` file or a Triton model directory),
    gRPC and HTTP on free ports, ready (ModelReady for every model) when the constructor returns.
    ``options``: more of the server's flags (``--metadata``, ``--output-names positional``,
    ``--headers-log FILE``). ``grpc_port``: a given one (a restart on the same endpoint)."""

    def __init__(self, work: Path, models: dict[str, Path], *options: str, grpc_port: int = 0,
                 timeout_s: float = 60.0) -> None:  # fmt: skip
        if not kserve_installed():
            raise RuntimeError(missing_message())
        self.models = dict(models)
        self.grpc_port, self.http_port = grpc_port or free_port(), free_port()
        work.mkdir(parents=True, exist_ok=True)
        self.log = work / f"kserve-{self.grpc_port}-{self.http_port}.log"
        served = [f"{name}={path}" for name, path in self.models.items()]
        command = [str(KSERVE_PYTHON), str(SERVER), "--grpc-port", str(self.grpc_port), "--http-port",
                   str(self.http_port), *options, *served]  # fmt: skip
        self._log_file: IO[bytes] = open(self.log, "wb")  # noqa: SIM115 - lives as long as the server
        self.process = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        """The SDK's cloud endpoint for this server."""
        return f"grpc://127.0.0.1:{self.grpc_port}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.target) as channel:
            stub = InferenceStub(channel)
            waiting = set(self.models)
            while waiting:
                if self.process.poll() is not None:
                    raise RuntimeError(f"KServe exited with {self.process.returncode}: {self.log_tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"KServe not ready after {timeout_s:.0f} s: {self.log_tail()}")
                for name in sorted(waiting):
                    try:
                        if stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=1.0).ready:
                            waiting.discard(name)
                    except grpc.RpcError:
                        break
                else:
                    continue
                time.sleep(0.2)

    def log_tail(self, chars: int = 3000) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._log_file.close()
