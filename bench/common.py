"""Helpers shared by the bench scripts: real models, signed artifacts, a hub in its own process."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "quickstart"))

from edge_agent.protocol.artifact import seal  # noqa: E402
from edge_agent.protocol.manifest import format_time  # noqa: E402
from edge_agent.protocol.signing import load_private_key  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def digits_cnn_onnx(path: Path) -> None:
    """The quickstart's 284k-parameter digits CNN (untrained weights: these benches time, not score)."""
    import digits

    from model_compiler.sources import export_onnx

    export_onnx(digits.DigitsCNN(), np.zeros((1, 1, 8, 8), np.float32), path)


def gemm_onnx(path: Path, seed: int = 0, features: int = 32, classes: int = 30) -> None:
    """A real 1k-parameter Gemm classifier: input 'input' [batch, features] → 'output' [batch, classes]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((features, classes)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "W", "B"], ["output"])], "gemm",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", classes])], [weight, bias],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def flaky_gemm_onnx(path: Path, above: float = 1.0, seed: int = 0) -> None:
    """``gemm_onnx``'s interface, but a row whose first input is above ``above`` makes the run raise (a
    Gather index out of range): a model that fails on a fraction of its inputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Gemm", ["input", "W", "B"], ["scores"]),
        helper.make_node("Slice", ["input", "zero", "one", "one"], ["first"]),
        helper.make_node("Reshape", ["first", "flat"], ["row"]),
        helper.make_node("Greater", ["row", "above"], ["bad"]),
        helper.make_node("Cast", ["bad"], ["bad_i"], to=TensorProto.INT64),
        helper.make_node("Mul", ["bad_i", "seven"], ["index"]),
        helper.make_node("Gather", ["table", "index"], ["offset"], axis=0),
        helper.make_node("Add", ["scores", "offset"], ["output"]),
    ]
    constants = {"W": rng.standard_normal((32, 30)).astype(np.float32), "B": np.zeros(30, np.float32),
                 "zero": np.array([0], np.int64), "one": np.array([1], np.int64), "flat": np.array([-1], np.int64),
                 "above": np.array(above, np.float32), "seven": np.array(7, np.int64),
                 "table": np.zeros((1, 30), np.float32)}  # fmt: skip
    graph = helper.make_graph(
        nodes, "flaky", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 30])],
        [numpy_helper.from_array(v, k) for k, v in constants.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def slow_gemm_onnx(path: Path, width: int = 1024, layers: int = 3, seed: int = 0, shared: bool = False) -> None:
    """``gemm_onnx``'s interface with ``layers`` extra ``width``-wide MatMuls: the same answers' shape,
    many times the work (a slower model version). With ``shared`` every layer multiplies by one matrix:
    the work grows with ``layers``, the artifact does not."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = {"W_in": rng.standard_normal((32, width)), "W_out": rng.standard_normal((width, 30))}
    matrices = ["W"] * layers if shared else [f"W_{i}" for i in range(layers)]
    weights |= {name: rng.standard_normal((width, width)) / np.sqrt(width) for name in dict.fromkeys(matrices)}
    names = ["h_in", *(f"h_{i}" for i in range(layers))]
    nodes = [helper.make_node("MatMul", ["input", "W_in"], ["h_in"])]
    nodes += [helper.make_node("MatMul", [names[i], matrices[i]], [names[i + 1]]) for i in range(layers)]
    nodes.append(helper.make_node("MatMul", [names[-1], "W_out"], ["output"]))
    graph = helper.make_graph(
        nodes, "slow", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 30])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def broken_gemm_onnx(path: Path) -> None:
    """Loads fine, fails at run time for batch 1 (30 values reshaped into rows of 7): a dying runtime."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["h"]), helper.make_node("Reshape", ["h", "S"], ["output"])],
        "broken", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((32, 30), np.float32), "W"),
         numpy_helper.from_array(np.array([-1, 7], np.int64), "S")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def artifact(work: Path, name: str, make_model: Callable[[Path], None], input_shape: list[Any],
             output_shape: list[Any], key: Path, reference: bool | np.ndarray = False,
             dirname: str | None = None, version: str = "1.0.0", release: int = 1) -> Path:  # fmt: skip
    """A signed fp32 ONNX artifact for x86-64-generic in ``work/(dirname or name)``; with ``reference``
    also a reference.json, of 64 random samples or of the samples given."""
    directory = work / (dirname or name)
    directory.mkdir()
    make_model(directory / "model.onnx")
    if reference is not False:
        import onnxruntime as ort

        from edge_agent.protocol.canonical import canonical_json
        from edge_agent.protocol.sketch import build_reference

        x = reference if isinstance(reference, np.ndarray) else np.random.default_rng(0).random(
            (64, *input_shape[1:]), np.float32
        )
        outputs = ort.InferenceSession(str(directory / "model.onnx")).run(None, {"input": x})[0]
        summary = build_reference({"input": x}, {"output": outputs})
        (directory / "reference.json").write_bytes(canonical_json(summary))
    now = datetime.now(UTC)
    seal(directory, {
        "name": name, "version": version, "release": release, "runtime": "onnxruntime", "precision": "fp32",
        "hardware": {"profile": "x86-64-generic", "arch": "x86_64", "accelerator": "none"},
        "inputs": [{"name": "input", "dtype": "float32", "shape": input_shape}],
        "outputs": [{"name": "output", "dtype": "float32", "shape": output_shape}],
        "source_sha256": "0" * 64, "created_at": format_time(now), "expires_at": format_time(now + timedelta(days=1)),
    }, load_private_key(key))  # fmt: skip
    return directory



def sized_artifact(work: Path, name: str, size_bytes: int, key: Path, chunk_size: int) -> Path:
    """A signed artifact of about ``size_bytes``: the Gemm model plus random weights, in ``work/name``."""
    import os

    directory = work / name
    directory.mkdir()
    gemm_onnx(directory / "model.onnx")
    (directory / "weights.bin").write_bytes(os.urandom(size_bytes))
    now = datetime.now(UTC)
    seal(directory, {
        "name": name, "version": "1.0.0", "release": 1, "runtime": "onnxruntime", "precision": "fp32",
        "hardware": {"profile": "x86-64-generic", "arch": "x86_64", "accelerator": "none"},
        "inputs": [{"name": "input", "dtype": "float32", "shape": ["batch", 32]}],
        "outputs": [{"name": "output", "dtype": "float32", "shape": ["batch", 30]}],
        "source_sha256": "0" * 64, "created_at": format_time(now), "expires_at": format_time(now + timedelta(days=1)),
    }, load_private_key(key), chunk_size=chunk_size)  # fmt: skip
    return directory


def drive(clients: list[Any], until: Callable[[], bool], timeout_s: float) -> None:
    """Run many paho clients from one select() loop (paho's own threads would fight for the GIL)."""
    import selectors

    selector = selectors.DefaultSelector()
    by_socket = {}
    for client in clients:
        sock = client.socket()
        by_socket[sock.fileno()] = client
        selector.register(sock, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    while not until() and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.01):
            by_socket[key.fd].loop_read(100)
        for client in clients:
            if client.want_write():
                client.loop_write()
            client.loop_misc()
    selector.close()

class HubProcess:
    """`cloud-hub serve` in its own process (embedded broker, free ports), with artifacts uploaded."""

    def __init__(self, work: Path, trust: Path, *extra: str, grpc_port: int = 0, admin_port: int = 0,
                 broker: str | None = None, state: Path | None = None) -> None:  # fmt: skip
        """``broker``: an external one (default: embedded on a free port). The same ``grpc_port`` again
        reuses the state (and its artifacts): a restart. ``state``: the state directory (default: one per
        gRPC port under ``work``)."""
        self.grpc_port, self.admin_port = grpc_port or free_port(), admin_port or free_port()
        self.state = state = state or work / f"hub-{self.grpc_port}"
        self.log = work / f"hub-{self.grpc_port}-{self.admin_port}.log"
        where = ["--broker", broker] if broker else ["--broker-port", str(free_port())]
        command = [sys.executable, "-c", "from cloud_hub.cli import main; main()", "serve", "--state-dir", str(state),
                   *where, "--grpc-port", str(self.grpc_port), "--admin-port",
                   str(self.admin_port), "--trust", str(trust), "--log-level", "WARNING", *extra]  # fmt: skip
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while "ready" not in self.log.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"hub did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        from cloud_hub.api_client import AdminClient

        self.admin = AdminClient(f"http://127.0.0.1:{self.admin_port}", (state / "operator.token").read_text().strip())

    @property
    def url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    def add(self, directory: Path) -> None:
        self.admin.add_artifact(directory)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)

    def kill(self) -> None:
        """SIGKILL: no clean shutdown (a crashed or powered-off hub)."""
        self.process.kill()
        self.process.wait(timeout=30)


MOSQUITTO_CONF = """listener {port} 127.0.0.1
allow_anonymous true
persistence true
persistence_location {work}/
persistence_file mosquitto-{port}.db
autosave_interval 5
max_queued_messages 1000000
max_queued_bytes 0
max_inflight_messages 100
message_size_limit 0
"""


class MosquittoProcess:
    """Mosquitto on a free port with its own config (its default queue of 1,000 drops silently). Anonymous
    and without ACLs, for the tests and benches that are not about confinement (the hub and enrolled agents
    send credentials, which it accepts); tests/test_mqtt_security.py runs the `cloud-hub broker-config` one."""

    def __init__(self, work: Path, port: int = 0) -> None:
        import shutil

        self.port = port or free_port()
        conf = work / f"mosquitto-{self.port}.conf"
        conf.write_text(MOSQUITTO_CONF.format(port=self.port, work=work.resolve()))
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise RuntimeError(
                "mosquitto is not installed; run 'make test' (it installs it) or apt-get install mosquitto"
            )
        self.process = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("mosquitto did not start") from None
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
