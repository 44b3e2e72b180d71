"""Resource limits on a real hub (Mosquitto, real admin HTTP, issue 14, observation 6) and the agent's
guard on telemetry acknowledgements (observation 4)."""

from __future__ import annotations

import io
import os
import resource
import shutil
import socket
import subprocess
import tarfile
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from common import gemm_onnx
from conftest import MosquittoProcess
from paho.mqtt.enums import CallbackAPIVersion

from cloud_hub.api_client import AdminClient
from cloud_hub.errors import Conflict
from cloud_hub.server import Hub, HubConfig, operator_token
from edge_agent.calls import CallBlock
from edge_agent.protocol.artifact import seal
from edge_agent.protocol.manifest import format_time
from edge_agent.protocol.messages import FetchRequest, to_wire
from edge_agent.protocol.signing import load_private_key
from edge_agent.spool import Spool

LIMIT = 8 * 1024 * 1024  # the upload limit of this module's hub


def start_hub(mosquitto: MosquittoProcess, state: Path, keys: tuple[Path, Path], **options: int) -> Hub:
    (state / "trust").mkdir(parents=True)
    shutil.copy(keys[1], state / "trust")
    running = Hub(HubConfig(state, broker=mosquitto.url, grpc_port=0, admin_port=0, **options))  # type: ignore[arg-type]
    running.start()
    return running


@pytest.fixture
def hub(mosquitto: MosquittoProcess, tmp_path: Path, keys: tuple[Path, Path]) -> Iterator[Hub]:
    running = start_hub(mosquitto, tmp_path / "hub", keys)  # the default limits
    yield running
    running.stop()


def admin(hub: Hub) -> AdminClient:
    assert hub.admin is not None
    return AdminClient(f"http://127.0.0.1:{hub.admin.port}", operator_token(hub.config.state_dir))


def raw_post(hub: Hub, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, bytes]:
    """A POST with exactly these headers (urllib would fix a bad Content-Length); the status and body."""
    assert hub.admin is not None
    with socket.create_connection(("127.0.0.1", hub.admin.port), timeout=5) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: hub\r\n{head}Connection: close\r\n\r\n".encode() + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    return status, reply.partition(b"\r\n\r\n")[2]


def disk_usage(root: Path) -> int:
    """Bytes allocated on disk under ``root`` (st_blocks: a sparse file counts what it really holds)."""
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


# /v1/enroll -------------------------------------------------------------------------------------------
def test_enroll_body_is_limited(hub: Hub) -> None:
    started = time.monotonic()
    status, body = raw_post(hub, "/v1/enroll", {"Content-Length": "-1", "Content-Type": "application/json"},
                            b'{"token": "' + b"x" * 100_000)  # fmt: skip
    assert 400 <= status < 500 and b"Content-Length" in body, body
    status, body = raw_post(hub, "/v1/enroll", {"Content-Length": str(1 << 30)})  # declared, never sent
    assert status == 413 and time.monotonic() - started < 5, body


# uploads ----------------------------------------------------------------------------------------------
def test_uploads_stream_through_cli_and_hub(hub: Hub, tmp_path: Path) -> None:
    """A 64 MiB upload (refused: not an artifact) through AdminClient.add_artifact into the hub in this
    process: Python's peak allocation stays far below the upload's size on both sides."""
    directory = tmp_path / "big"
    directory.mkdir()
    (directory / "manifest.json").write_text("{}")
    with (directory / "weights.bin").open("wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(Conflict, match="signature not found"):
            admin(hub).add_artifact(directory)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"peak {peak >> 20} MiB for a 64 MiB upload: the CLI and hub must stream it"


def test_an_upload_over_the_limit_is_refused_naming_it(mosquitto: MosquittoProcess, tmp_path: Path,
                                                       keys: tuple[Path, Path]) -> None:  # fmt: skip
    hub = start_hub(mosquitto, tmp_path / "hub", keys, max_upload_bytes=LIMIT)
    try:
        check_upload_limit(hub)
    finally:
        hub.stop()


def check_upload_limit(hub: Hub) -> None:
    status, body = raw_post(hub, "/v1/artifacts", {"Authorization": f"Bearer {admin(hub).token}",
                                                   "Content-Length": str(LIMIT + 1)})  # fmt: skip
    assert status in (400, 413) and str(LIMIT).encode() in body, body


def sparse_tar(tmp_path: Path, declared: int) -> Path:
    """A GNU tar of a sparse file of ``declared`` bytes (a few KiB on disk and in the tar)."""
    source = tmp_path / "sparse"
    source.mkdir()
    with (source / "model.onnx").open("wb") as f:
        f.truncate(declared)
    out = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "-cf", str(out), "-C", str(source), "model.onnx"], check=True)
    return out


def test_a_sparse_tar_declaring_gibs_is_refused_before_expansion(hub: Hub, tmp_path: Path) -> None:
    tar = sparse_tar(tmp_path, 1 << 30)
    assert tar.stat().st_size <= 20 * 1024
    disk_before, rss_before = disk_usage(hub.config.state_dir), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(Conflict, match=r"sparse|over"):
        admin(hub).request("POST", "/v1/artifacts", tar.read_bytes(), "application/x-tar")
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kib < 64 * 1024, f"the hub's peak memory grew {grown_kib >> 10} MiB for a {tar.stat().st_size} B tar"
    assert disk_usage(hub.config.state_dir) - disk_before < 1 << 20, "the upload was expanded on the hub's disk"


def tar_with(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(member, io.BytesIO(data) if data else None)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo", "chardev", "climbing", "absolute", "huge"])
def test_a_tar_with_links_devices_or_outside_paths_is_refused(hub: Hub, kind: str) -> None:
    member = tarfile.TarInfo("model.onnx")
    if kind in ("symlink", "hardlink"):
        member.type, member.linkname = (tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE), "/etc/passwd"
    elif kind in ("fifo", "chardev"):
        member.type = tarfile.FIFOTYPE if kind == "fifo" else tarfile.CHRTYPE
    elif kind == "climbing":
        member.name = "../../outside.onnx"
    elif kind == "absolute":
        member.name = "/tmp/outside.onnx"
    body = tar_with(member, b"x" if kind in ("climbing", "absolute") else b"")
    if kind == "huge":  # a header declaring 1 TiB, the archive cut short: refused from the header alone
        member.size = 1 << 40
        body = member.tobuf(tarfile.GNU_FORMAT) + b"\0" * 1024
    with pytest.raises(Conflict, match=r"not a plain file|outside the artifact|declare over|not a tar"):
        admin(hub).request("POST", "/v1/artifacts", body, "application/x-tar")
    assert not list((hub.config.state_dir / "artifacts").glob(".upload-*"))


# chunk requests ---------------------------------------------------------------------------------------
def big_artifact(directory: Path, key: Path, blob_bytes: int) -> Path:
    """A signed Gemm artifact with a ``blob_bytes`` payload file beside the model (4 KiB chunks)."""
    directory.mkdir(parents=True)
    gemm_onnx(directory / "model.onnx", 0)
    (directory / "blob.bin").write_bytes(np.random.default_rng(0).bytes(blob_bytes))
    now = datetime.now(UTC)
    seal(directory, {"name": "gemm", "version": "1.0.0", "release": 1,
                     "hardware": {"profile": "x86-64-generic", "arch": "x86_64", "accelerator": "none"},
                     "runtime": "onnxruntime", "precision": "fp32",
                     "inputs": [{"name": "input", "dtype": "float32", "shape": ["batch", 32]}],
                     "outputs": [{"name": "output", "dtype": "float32", "shape": ["batch", 30]}],
                     "source_sha256": "0" * 64, "created_at": format_time(now - timedelta(days=1)),
                     "expires_at": format_time(now + timedelta(days=30))},
         load_private_key(key), chunk_size=4096)  # fmt: skip
    return directory


def test_chunk_request_amplification_is_bounded(hub: Hub, mosquitto: MosquittoProcess, tmp_path: Path,
                                                keys: tuple[Path, Path]) -> None:  # fmt: skip
    """17 KB of whole-artifact fetch requests from one device, 10 ms apart: the hub sends the artifact
    at most about twice (one fetch and one full re-ask), not once per request."""
    artifact_id = admin(hub).add_artifact(big_artifact(tmp_path / "a", keys[0], 256 * 1024))["artifact_id"]
    size = sum(f["size"] for f in hub.registry.artifact(artifact_id)["manifest"]["files"])
    assert hub.control is not None
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="attacker")
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    request = to_wire(FetchRequest(artifact_id))
    sent = 0
    try:
        while sent < 17_000:
            client.publish(hub.topics.fetch("dev-1"), request, qos=1).wait_for_publish(5)
            sent += len(request)
            time.sleep(0.01)
        last = -1
        while last != hub.control.bytes_sent:  # until the hub has stopped sending
            last = hub.control.bytes_sent
            time.sleep(1.0)
    finally:
        client.loop_stop()
        client.disconnect()
    amplification = hub.control.bytes_sent / sent
    print(f"{sent} B of requests → {hub.control.bytes_sent} B of chunks ({amplification:.0f}x; artifact {size} B)")
    assert hub.control.bytes_sent >= size  # the first fetch is served whole
    assert hub.control.bytes_sent <= 2.5 * size, (
        f"{sent} B of requests made the hub send {hub.control.bytes_sent} B ({amplification:.0f}x): "
        "chunk requests must be rate-limited per device (ControlPlane._on_fetch)"
    )


# telemetry acks ----------------------------------------------------------------------------------------
def test_a_forged_ack_for_an_unsent_seq_loses_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "telemetry.db")
    n = 500
    block = CallBlock("m", "1", "local", np.full(n, time.time()), np.ones(n, np.float32), np.ones(n, np.uint8))
    spool.append([block])
    batch = spool.next_batch("dev")
    assert batch is not None and batch.seq == 1
    assert not spool.acknowledge(2, batch.epoch), "an ack for a seq never sent removed batches"
    assert not spool.acknowledge(10**9), "an ack for a seq never sent removed batches"
    assert not spool.acknowledge(1, "another spool's epoch")
    again = spool.next_batch("dev")
    assert again is not None and (again.seq, sum(w.count for w in again.windows)) == (1, n), (
        "a forged ack (unsent seq or another epoch) lost the unacknowledged batch: Spool.acknowledge must ignore it"
    )
    assert spool.acknowledge(1, batch.epoch)  # the hub's real ack
    assert spool.next_batch("dev") is None
