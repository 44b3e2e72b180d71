"""Shared fixtures: signing keys, real ONNX models, real brokers on free ports."""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge_agent.protocol.artifact import seal
from edge_agent.protocol.manifest import format_time
from edge_agent.protocol.signing import generate_keypair, load_private_key

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "quickstart"))
sys.path.insert(0, str(ROOT / "bench"))  # bench/common.py: the real models and brokers both use

from common import MosquittoProcess, broken_gemm_onnx, free_port, gemm_onnx  # noqa: E402

__all__ = ["MosquittoProcess", "broken_gemm_onnx", "free_port", "gemm_onnx"]


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


def make_artifact(
    directory: Path,
    key_path: Path,
    *,
    name: str = "gemm",
    version: str = "1.0.0",
    release: int = 1,
    profile: str = "x86-64-generic",
    expires_in: timedelta = timedelta(days=30),
    seed: int = 0,
    chunk_size: int = 1024,
    golden: bool = False,
) -> Path:
    """A signed Gemm artifact, small chunks so it has several; ``golden``: with golden samples (8 random
    rows, expected outputs from this model, top1 tolerance) written by the compiler's own code."""
    directory.mkdir(parents=True)
    gemm_onnx(directory / "model.onnx", seed)
    now = datetime.now(UTC)
    fields = {
        "name": name,
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
    if golden:
        fields["validation"] = {"golden": add_golden(directory)}
    seal(directory, fields, load_private_key(key_path), chunk_size=chunk_size)
    return directory


def add_golden(directory: Path, metric: str = "top1", rows: int = 64) -> dict[str, Any]:
    """golden.npz for ``directory/model.onnx`` (input 'input' [batch, 32] → 'output'), from ``rows``
    seeded random rows, and its ``validation.golden`` entry (model_compiler.golden.write_golden)."""
    import onnxruntime as ort

    from model_compiler.golden import write_golden

    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(7).standard_normal((rows, 32)).astype(np.float32)

    def predict(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(session.run(None, feeds)[0])

    entry = write_golden(directory, {"input": x}, predict({"input": x}), None, "output", metric, predict)
    assert entry is not None
    return entry


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


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[str]:
    """A PostgreSQL server's admin URL (tests/pg_server.py: EDGEFED_TEST_POSTGRES, the local service on
    5432, or one started from Debian's packages); skips when there is none (make system-deps installs it)."""
    from pg_server import postgres_server

    with postgres_server(free_port()) as url:
        if url is None:
            pytest.skip("no PostgreSQL: set EDGEFED_TEST_POSTGRES or install postgresql (make system-deps)")
        yield url


@pytest.fixture
def postgres_url(postgres_admin: str) -> Iterator[str]:
    """The URL of a new, empty database of its own for this test (dropped after)."""
    from pg_server import fresh_database

    with fresh_database(postgres_admin) as url:
        yield url


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    broker = MosquittoProcess(tmp_path)
    yield broker
    broker.stop()


@pytest.fixture
def hub(mosquitto: MosquittoProcess, tmp_path: Path, keys: tuple[Path, Path]) -> Iterator[Any]:
    """A hub on Mosquitto (free gRPC and admin ports) trusting ``keys``; modules with other needs define
    their own ``hub``."""
    from cloud_hub.server import Hub, HubConfig

    state = tmp_path / "hub"
    (state / "trust").mkdir(parents=True)
    shutil.copy(keys[1], state / "trust")
    running = Hub(HubConfig(state, broker=mosquitto.url, grpc_port=0, admin_port=0))
    running.start()
    yield running
    running.stop()


@pytest.fixture
def device(tmp_path: Path, keys: tuple[Path, Path]) -> tuple[Path, Any, Any]:
    """A configured x86-64-generic device (dev-1) with no model: its state dir, store and trust store."""
    from edge_agent.config import AgentConfig
    from edge_agent.protocol.signing import TrustStore
    from edge_agent.store import ModelStore

    state = tmp_path / "device"
    (state / "trust").mkdir(parents=True)
    shutil.copy(keys[1], state / "trust")
    AgentConfig(device_id="dev-1", profile="x86-64-generic").save(state)
    return state, ModelStore(state / "models"), TrustStore.from_dir(state / "trust")


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
        from cloud_hub.accounting import UsageCounter
        from cloud_hub.artifacts import ArtifactStore
        from cloud_hub.inference import (
            InferenceOptions,
            ModelRepository,
            start_inference_server,
            token_hash,
        )
        from cloud_hub.registry import SQLiteRegistry
        from device_profiles import get_profile
        from edge_agent.protocol.signing import TrustStore

        root.mkdir(parents=True, exist_ok=True)
        self.registry = SQLiteRegistry(str(root / "registry.db"))
        self.store = ArtifactStore(root / "artifacts", TrustStore.from_dir(keys[1].parent))
        self.repository = ModelRepository(
            self.registry, self.store, get_profile("x86-64-generic"), InferenceOptions(**options)
        )
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


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free port, with dummy credentials in the environment (boto3's default chain;
    hub processes the tests start inherit them)."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            env.delenv(name, raising=False)
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop()
