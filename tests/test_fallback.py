"""Fallback policies, circuit breakers, deadlines, budgets, batching and queue limits on real servers."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from common import artifact
from conftest import InferenceServer, broken_gemm_onnx, make_artifact

from cloud_hub.batching import Batcher, QueueFull
from cloud_hub.inference import token_hash
from device_profiles import get_profile
from edge_agent import EdgeClient
from edge_agent.cloud import CloudClient
from edge_agent.config import AgentConfig
from edge_agent.errors import CloudThrottled, CloudUnavailable, ModelNotDeployed
from edge_agent.protocol.artifact import seal
from edge_agent.protocol.oip import add_servicer
from edge_agent.protocol.signing import TrustStore, load_private_key
from edge_agent.routing import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, RateBudget, confidence
from edge_agent.store import ModelStore

X = np.random.default_rng(2).standard_normal((1, 32)).astype(np.float32)


@pytest.fixture
def cloud(tmp_path: Path, keys: tuple[Path, Path]) -> Iterator[InferenceServer]:
    server = InferenceServer(tmp_path / "hub", keys)
    server.register(make_artifact(tmp_path / "cloud-gemm", keys[0]))
    server.register(_named(tmp_path / "big", keys[0], "big"))
    yield server
    server.stop()


def _named(directory: Path, key: Path, name: str) -> Path:
    """A Gemm artifact under another model name (the cascade's bigger cloud model)."""
    artifact = make_artifact(directory, key, seed=9)
    doc = json.loads((artifact / "manifest.json").read_text())
    fields = {k: v for k, v in doc.items() if k not in ("files", "chunk_size", "schema")}
    (artifact / "manifest.json").unlink()
    (artifact / "signature").unlink()
    seal(artifact, {**fields, "name": name}, load_private_key(key))
    return artifact


def broken_artifact(directory: Path, key: Path) -> Path:
    """A model that loads but fails at run time for batch 1 (Reshape of 30 values into rows of 7)."""
    return artifact(directory.parent, "gemm", broken_gemm_onnx, ["batch", 32], ["batch", 30], key,
                    dirname=directory.name)  # fmt: skip


def device(tmp_path: Path, keys: tuple[Path, Path], artifact: Path | None, cloud: str | None) -> Path:
    state = tmp_path / "device"
    (state / "trust").mkdir(parents=True)
    shutil.copy(keys[1], state / "trust")
    AgentConfig(device_id="dev-1", profile="x86-64-generic", cloud=cloud).save(state)
    if artifact is not None:
        store = ModelStore(state / "models")
        manifest = store.install(artifact, TrustStore.from_dir(state / "trust"), get_profile("x86-64-generic"))
        store.activate(manifest.name, manifest.version)
    return state


def test_breaker_states() -> None:
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout_s=0.05)
    for _ in range(2):
        breaker.failure()
    assert breaker.state == CLOSED and breaker.allow()
    breaker.failure()
    assert breaker.state == OPEN and not breaker.allow()
    time.sleep(0.06)
    assert breaker.allow() and breaker.state == HALF_OPEN
    assert not breaker.allow()  # one probe at a time
    breaker.failure()
    assert breaker.state == OPEN and not breaker.allow()
    time.sleep(0.06)
    assert breaker.allow()
    breaker.success()
    assert breaker.state == CLOSED and breaker.allow() and breaker.opened_count == 2


def test_confidence_measures_and_budget() -> None:
    sure, unsure = np.array([[10.0, 0.0, 0.0]]), np.array([[1.0, 1.0, 1.0]])
    for measure in ("max_softmax", "margin", "entropy"):
        assert confidence(sure, measure) > 0.9 > confidence(unsure, measure)  # type: ignore[arg-type]
    budget = RateBudget(per_minute=2)
    assert budget.take() and budget.take() and not budget.take() and budget.throttled == 1


def test_local_only_and_cloud_only(tmp_path: Path, keys: tuple[Path, Path], cloud: InferenceServer) -> None:
    state = device(tmp_path, keys, None, cloud.url)
    with EdgeClient(state, policy="local_only", telemetry=False) as client, pytest.raises(ModelNotDeployed):
        client.infer("gemm", {"input": X})
    with EdgeClient(state, policy="cloud_only", telemetry=False) as client:
        result = client.infer("gemm", {"input": X})
        assert result.route == "cloud" and result.reason == "policy cloud_only"
    assert cloud.usage.drain()[("dev-1", "gemm")] == 1  # counted per device and model


def test_cloud_calls_from_threads_and_from_a_running_event_loop(tmp_path: Path, keys: tuple[Path, Path],
                                                                 cloud: InferenceServer) -> None:  # fmt: skip
    """Streams are pooled across threads (at most one per concurrent caller); a thread that already runs
    an event loop cannot run the stream's loop, so its call goes unary and still answers."""
    state = device(tmp_path, keys, None, cloud.url)
    with EdgeClient(state, policy="cloud_only", telemetry=False) as client:
        expected = client.infer("gemm", {"input": X}).outputs["output"]
        with futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: client.infer("gemm", {"input": X}).outputs["output"], range(40)))
        assert all(np.array_equal(a, expected) for a in answers)
        cloud_client = client._cloud
        assert cloud_client is not None and 1 <= cloud_client._idle.qsize() <= 5  # one per concurrent caller

        async def from_a_coroutine() -> Any:
            return client.infer("gemm", {"input": X})

        result = asyncio.run(from_a_coroutine())
        assert result.route == "cloud" and np.array_equal(result.outputs["output"], expected)
        assert cloud_client.streaming  # other threads keep streaming


def test_local_first_falls_back_when_the_local_runtime_fails(tmp_path: Path, keys: tuple[Path, Path],
                                                             cloud: InferenceServer) -> None:  # fmt: skip
    state = device(tmp_path, keys, broken_artifact(tmp_path / "broken", keys[0]), cloud.url)
    with EdgeClient(state, telemetry=False) as client:
        first = client.infer("gemm", {"input": X})
        assert first.route == "cloud" and "local runtime failed" in first.reason
        for _ in range(3):
            client.infer("gemm", {"input": X})
        later = client.infer("gemm", {"input": X})
        assert later.route == "cloud" and "breaker open" in later.reason  # a dead runtime costs nothing now


def test_cloud_first_uses_local_when_cloud_is_down(
    tmp_path: Path, keys: tuple[Path, Path], cloud: InferenceServer
) -> None:
    state = device(tmp_path, keys, make_artifact(tmp_path / "a", keys[0]), cloud.url)
    with EdgeClient(state, policy="cloud_first", telemetry=False, cloud_timeout_s=0.5) as client:
        assert client.infer("gemm", {"input": X}).route == "cloud"
        cloud.stop()
        result = client.infer("gemm", {"input": X})
        assert result.route == "local" and "cloud failed" in result.reason


def test_cascade_escalates_only_unconfident_answers(
    tmp_path: Path, keys: tuple[Path, Path], cloud: InferenceServer
) -> None:
    state = device(tmp_path, keys, make_artifact(tmp_path / "a", keys[0]), cloud.url)
    with EdgeClient(state, policy="cascade", cascade_model="big", cascade_threshold=1.01, latency_budget_ms=2000,
                    telemetry=False) as client:  # fmt: skip
        result = client.infer("gemm", {"input": X})
        assert result.route == "cloud" and result.model == "big" and "max_softmax" in result.reason
    with EdgeClient(state, policy="cascade", cascade_model="big", cascade_threshold=0.0, telemetry=False) as client:
        assert client.infer("gemm", {"input": X}).route == "local"


def test_cloud_budget_throttles_and_counts(tmp_path: Path, keys: tuple[Path, Path], cloud: InferenceServer) -> None:
    state = device(tmp_path, keys, None, cloud.url)
    with EdgeClient(state, cloud_budget_per_minute=2) as client:
        client.infer("gemm", {"input": X})
        client.infer("gemm", {"input": X})
        with pytest.raises(CloudThrottled, match="budget"):
            client.infer("gemm", {"input": X})
    from edge_agent.telemetry import Spool

    batch = Spool(state / "telemetry.db").next_batch("dev-1")
    assert batch is not None and {w.route: w.count for w in batch.windows} == {"cloud": 2, "throttled": 1}


class HangingServicer:
    """A cloud that accepts calls and never answers in time (the real failure mode of a stuck server)."""

    def __getattr__(self, name: str) -> Any:
        def hang(request: Any, context: grpc.ServicerContext) -> Any:
            time.sleep(3)
            context.abort(grpc.StatusCode.UNAVAILABLE, "too late")

        return hang


def test_hanging_cloud_costs_only_the_deadline(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    add_servicer(HangingServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        state = device(tmp_path, keys, make_artifact(tmp_path / "a", keys[0]), f"grpc://127.0.0.1:{port}")
        with EdgeClient(state, policy="cloud_first", cloud_timeout_s=0.2, telemetry=False) as client:
            start = time.perf_counter()
            result = client.infer("gemm", {"input": X})
            assert result.route == "local" and time.perf_counter() - start < 0.2 + 0.1
            for _ in range(3):
                client.infer("gemm", {"input": X})
            start = time.perf_counter()
            assert client.infer("gemm", {"input": X}).route == "local"
            assert time.perf_counter() - start < 0.01  # breaker open: the dead cloud costs nothing
        only_cloud = EdgeClient(state, policy="cloud_only", cloud_timeout_s=0.2, telemetry=False)
        with only_cloud, pytest.raises(CloudUnavailable, match="DEADLINE_EXCEEDED"):
            only_cloud.infer("gemm", {"input": X})
    finally:
        server.stop(0)


def test_device_token_required(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    server = InferenceServer(tmp_path / "hub", keys, require_token=True)
    server.register(make_artifact(tmp_path / "g", keys[0]))
    server.tokens[token_hash("s3cret")] = "dev-7"
    try:
        state = device(tmp_path, keys, None, server.url)
        with EdgeClient(state, telemetry=False) as client, pytest.raises(CloudUnavailable, match="UNAUTHENTICATED"):
            client.infer("gemm", {"input": X})
        with CloudClient(server.url) as cloud:  # each call opens a stream the server aborts: a race to write
            for _ in range(100):
                with pytest.raises(CloudUnavailable, match="UNAUTHENTICATED"):
                    cloud.infer("gemm", {"input": X})
        config = AgentConfig.load(state)
        AgentConfig(**{**config.__dict__, "cloud_token": "s3cret"}).save(state)
        with EdgeClient(state, telemetry=False) as client:
            assert client.infer("gemm", {"input": X}).route == "cloud"
        assert server.usage.drain() == {("dev-7", "gemm"): 1}
    finally:
        server.stop()


def test_batcher_batches_concurrent_requests_and_bounds_its_queue() -> None:
    calls: list[int] = []

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(len(inputs["x"]))
        return {"y": inputs["x"] * 2}

    def item(i: int) -> dict[str, np.ndarray]:
        return {"x": np.full((1, 2), i, np.float32)}

    async def scenario() -> None:
        batcher = Batcher(run, max_batch_rows=64, queue_size=32)
        results = await asyncio.gather(*(batcher.submit(item(i), 5) for i in range(20)))
        assert all(np.all(r["y"] == 2 * i) for i, r in enumerate(results))
        assert calls == [1] * 20  # CPU mode: each found the model idle and ran at once, no hop, no wait
        calls.clear()
        offloaded = Batcher(run, max_batch_rows=64, queue_size=32, offload=True)  # GPU mode: batches form
        await asyncio.gather(*(offloaded.submit(item(i), 5) for i in range(20)))
        assert calls == [20]
        calls.clear()
        capped = Batcher(run, max_batch_rows=4, queue_size=32, offload=True)
        await asyncio.gather(*(capped.submit(item(i), 5) for i in range(10)))
        assert calls == [4, 4, 2]
        tiny = Batcher(run, max_batch_rows=1, queue_size=2, offload=True)
        waiting = [asyncio.ensure_future(tiny.submit(item(i), 5)) for i in range(2)]
        await asyncio.sleep(0)  # both are pending, the drain has not run yet
        with pytest.raises(QueueFull):
            await tiny.submit(item(9), 5)
        await asyncio.gather(*waiting)
        slow = Batcher(run, max_batch_rows=8, delay_s=0.5)
        start = time.perf_counter()
        with pytest.raises(TimeoutError):
            await slow.submit(item(1), 0.05)
        assert time.perf_counter() - start < 0.3 and not slow._pending  # left the queue at its deadline

    asyncio.run(scenario())
