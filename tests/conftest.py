"""Shared fixtures: signing keys, real ONNX models, real brokers on free ports."""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_agent.protocol.artifact import seal
from edge_agent.protocol.manifest import format_time
from edge_agent.protocol.signing import generate_keypair, load_private_key

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "quickstart"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Any, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def tree_digest(root: Path) -> str:
    """A digest of every path and file content under ``root``: equal digests mean byte-identical trees."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("keys"))


def gemm_model(path: Path, seed: int = 0, features: int = 32, classes: int = 30) -> None:
    """A real 1k-parameter Gemm classifier as ONNX (input 'input' [batch, features] → 'output')."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((features, classes)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "W", "B"], ["output"])],
        "gemm",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", classes])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def make_artifact(
    directory: Path,
    key_path: Path,
    *,
    version: str = "1.0.0",
    release: int = 1,
    profile: str = "x86-64-generic",
    expires_in: timedelta = timedelta(days=30),
    seed: int = 0,
    chunk_size: int = 1024,
) -> Path:
    """A signed Gemm artifact, small chunks so it has several."""
    directory.mkdir(parents=True)
    gemm_model(directory / "model.onnx", seed)
    now = datetime.now(UTC)
    fields = {
        "name": "gemm",
        "version": version,
        "release": release,
        "hardware": {"profile": profile, "arch": "x86_64", "accelerator": "none"},
        "runtime": "onnxruntime",
        "precision": "fp32",
        "inputs": [{"name": "input", "dtype": "float32", "shape": ["batch", 32]}],
        "outputs": [{"name": "output", "dtype": "float32", "shape": ["batch", 30]}],
        "source_sha256": "0" * 64,
        "created_at": format_time(now - timedelta(days=1)),
        "expires_at": format_time(now + expires_in),
    }
    seal(directory, fields, load_private_key(key_path), chunk_size=chunk_size)
    return directory


@pytest.fixture(scope="session")
def digits_artifact(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> dict[str, Any]:
    """The quickstart digits CNN, trained briefly and compiled for x86-64-generic (fp32 and int8 gated)."""
    import os

    import digits

    from model_compiler import CompileOptions, compile_model

    work = tmp_path_factory.mktemp("digits")
    digits.train(work, epochs=4)
    os.environ["DIGITS_WEIGHTS"] = str(work / "digits_cnn.pt")
    _, x_test, _, y_test = digits.digits_split()
    options = CompileOptions(name="digits-cnn", version="1.0.0", key_path=keys[0], release=1)
    reports = compile_model(
        f"{ROOT / 'examples/quickstart/digits.py'}:trained",
        ["x86-64-generic"],
        (np.load(work / "calib.npz")["x"], None),
        (x_test, y_test),
        work / "out",
        options,
    )
    return {"path": Path(reports[0].artifact), "report": reports[0], "x": x_test, "y": y_test}


MOSQUITTO_CONF = """listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 100000
max_inflight_messages 100
message_size_limit 0
"""


def _mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if found is None:
        raise RuntimeError("mosquitto is not installed; run 'make test' (it installs it) or apt-get install mosquitto")
    return found


class MosquittoBroker:
    """A real Mosquitto on a free port with its own config (queues raised: the default drops silently)."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text(MOSQUITTO_CONF.format(port=self.port))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen([_mosquitto_binary(), "-c", str(self.conf)], stderr=subprocess.DEVNULL)

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            except OSError:
                return False

        wait_for("mosquitto", listening, 10)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    broker = MosquittoBroker(tmp_path)
    broker.start()
    yield broker
    broker.stop()


DTYPES = {"fp32": ("float32", TensorProto.FLOAT), "fp16": ("float16", TensorProto.FLOAT16),
          "int64": ("int64", TensorProto.INT64), "int32": ("int32", TensorProto.INT32),
          "uint8": ("uint8", TensorProto.UINT8), "bool": ("bool", TensorProto.BOOL),
          "bytes": ("bytes", TensorProto.STRING)}  # fmt: skip


def dtypes_artifact(directory: Path, key_path: Path) -> Path:
    """A real ONNX model with one Identity per OIP datatype: input ``in_X`` → output ``out_X``, shape [batch, 3]."""
    directory.mkdir(parents=True)
    nodes = [helper.make_node("Identity", [f"in_{k}"], [f"out_{k}"]) for k in DTYPES]
    inputs = [helper.make_tensor_value_info(f"in_{k}", t, ["batch", 3]) for k, (_, t) in DTYPES.items()]
    outputs = [helper.make_tensor_value_info(f"out_{k}", t, ["batch", 3]) for k, (_, t) in DTYPES.items()]
    model = helper.make_model(helper.make_graph(nodes, "dtypes", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    model.ir_version = 8
    onnx.save(model, str(directory / "model.onnx"))
    now = datetime.now(UTC)
    fields = {
        "name": "dtypes", "version": "1.0.0", "release": 1, "runtime": "onnxruntime", "precision": "fp32",
        "hardware": {"profile": "x86-64-generic", "arch": "x86_64", "accelerator": "none"},
        "inputs": [{"name": f"in_{k}", "dtype": d, "shape": ["batch", 3]} for k, (d, _) in DTYPES.items()],
        "outputs": [{"name": f"out_{k}", "dtype": d, "shape": ["batch", 3]} for k, (d, _) in DTYPES.items()],
        "source_sha256": "0" * 64, "created_at": format_time(now), "expires_at": format_time(now + timedelta(days=1)),
    }  # fmt: skip
    seal(directory, fields, load_private_key(key_path))
    return directory


class InferenceServer:
    """The hub's OIP gRPC server on port 0 over a real registry and artifact store (no MQTT needed)."""

    def __init__(self, root: Path, keys: tuple[Path, Path], **options: Any) -> None:
        from cloud_hub.artifacts import ArtifactStore
        from cloud_hub.inference import (
            InferenceOptions,
            ModelRepository,
            UsageCounter,
            start_inference_server,
            token_hash,
        )
        from cloud_hub.registry import SQLiteRegistry
        from edge_agent.protocol.signing import TrustStore

        root.mkdir(parents=True, exist_ok=True)
        self.registry = SQLiteRegistry(str(root / "registry.db"))
        self.store = ArtifactStore(root / "artifacts", TrustStore.from_dir(keys[1].parent))
        self.repository = ModelRepository(self.registry, self.store, "x86_64", InferenceOptions(**options))
        self.usage = UsageCounter()
        self.tokens: dict[str, str] = {}
        self.server = start_inference_server(
            self.repository, "127.0.0.1", 0, "test", self.usage, lambda token: self.tokens.get(token_hash(token))
        )
        self.port = self.server.port

    @property
    def url(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def register(self, artifact: Path) -> None:
        manifest = self.store.add(artifact)
        self.registry.add_artifact(manifest, self.store.signature(manifest.artifact_id))
        self.repository.invalidate()

    def stop(self) -> None:
        self.server.stop(grace_s=0)
