"""The artifact store contract on both backends: the local directory and S3-compatible storage (moto's
server mode on a free port, reached over HTTP by boto3 as any S3 server would be); then the S3 store's
own faults (a corrupted or altered object, an upload or download cut short) and a hub serving from S3."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from artifact_store_contract import ArtifactStoreContract, file_chunks
from conftest import free_port, make_artifact

from cloud_hub.artifacts import ArtifactLocation, ArtifactStore, open_artifacts
from cloud_hub.artifacts_s3 import CONNECT_TIMEOUT_S, S3ArtifactStore, client_config, make_client, parse_s3_url
from edge_agent.errors import ConfigError
from edge_agent.protocol.errors import ArtifactRejected
from edge_agent.protocol.signing import TrustStore


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    name = f"edgefed-{uuid.uuid4().hex[:12]}"
    make_client(s3_endpoint, None).create_bucket(Bucket=name)
    return name


def s3_store(endpoint: str, bucket: str, cache: Path, keys: tuple[Path, Path]) -> S3ArtifactStore:
    return S3ArtifactStore(f"s3://{bucket}/hub/artifacts", TrustStore.from_dir(keys[1].parent), cache, endpoint)


def flip(data: bytes, at: int = 10) -> bytes:
    changed = bytearray(data)
    changed[at] ^= 0xFF
    return bytes(changed)


class TestLocalDirectory(ArtifactStoreContract):
    @pytest.fixture(autouse=True)
    def _store(self, tmp_path: Path, keys: tuple[Path, Path]) -> None:
        self.store = ArtifactStore(tmp_path / "artifacts", TrustStore.from_dir(keys[1].parent))

    def corrupt(self, artifact_id: str, name: str) -> None:
        path = self.store.path(artifact_id) / name
        path.write_bytes(flip(path.read_bytes()))


class TestS3(ArtifactStoreContract):
    @pytest.fixture(autouse=True)
    def _store(self, tmp_path: Path, keys: tuple[Path, Path], s3_endpoint: str, bucket: str) -> None:
        self.store = s3_store(s3_endpoint, bucket, tmp_path / "cache", keys)

    def corrupt(self, artifact_id: str, name: str) -> None:
        key = self.store.key(artifact_id, name)
        body = self.store.client.get_object(Bucket=self.store.bucket, Key=key)["Body"].read()
        self.store.client.put_object(Bucket=self.store.bucket, Key=key, Body=flip(body))


# --- the S3 store's own cases --------------------------------------------------------------------------


def test_objects_are_laid_out_under_the_prefix(tmp_path: Path, keys: tuple[Path, Path], s3_endpoint: str,
                                               bucket: str) -> None:  # fmt: skip
    store = s3_store(s3_endpoint, bucket, tmp_path / "cache", keys)
    manifest = store.add(make_artifact(tmp_path / "a", keys[0]))
    listed = store.client.list_objects_v2(Bucket=bucket)["Contents"]
    names = {str(o["Key"]) for o in listed}
    assert names == {f"hub/artifacts/{manifest.artifact_id}/{n}" for n in ("manifest.json", "signature", "model.onnx")}
    assert not (tmp_path / "cache" / manifest.artifact_id).exists()  # nothing cached until it is read


def test_a_corrupted_object_is_refused_on_read(tmp_path: Path, keys: tuple[Path, Path], s3_endpoint: str,
                                               bucket: str) -> None:  # fmt: skip
    """Ranged GETs refuse a chunk whose sha256 is not the manifest's; the download to the cache refuses
    the file and leaves no cache entry and no temporary directory behind."""
    artifact = make_artifact(tmp_path / "a", keys[0], chunk_size=1000)
    writer = s3_store(s3_endpoint, bucket, tmp_path / "writer", keys)
    manifest = writer.add(artifact)
    key = writer.key(manifest.artifact_id, "model.onnx")
    body = writer.client.get_object(Bucket=bucket, Key=key)["Body"].read()
    writer.client.put_object(Bucket=bucket, Key=key, Body=flip(body, at=2500))  # in chunk 2 only
    reader = s3_store(s3_endpoint, bucket, tmp_path / "reader", keys)
    chunks = file_chunks(artifact, manifest)
    assert reader.read_chunk(manifest, 0, 0) == chunks[(0, 0)]  # the intact chunks still serve
    with pytest.raises(ArtifactRejected) as caught:
        reader.read_chunk(manifest, 0, 2)
    assert caught.value.reason == "chunk"
    with pytest.raises(ArtifactRejected):
        reader.path(manifest.artifact_id)
    assert list((tmp_path / "reader").iterdir()) == []


def test_an_altered_manifest_or_a_longer_object_is_refused(tmp_path: Path, keys: tuple[Path, Path],
                                                           s3_endpoint: str, bucket: str) -> None:  # fmt: skip
    store = s3_store(s3_endpoint, bucket, tmp_path / "cache", keys)
    manifest = store.add(make_artifact(tmp_path / "a", keys[0]))
    key = store.key(manifest.artifact_id, "model.onnx")
    body = store.client.get_object(Bucket=bucket, Key=key)["Body"].read()
    store.client.put_object(Bucket=bucket, Key=key, Body=body + b"\0" * 4096)
    with pytest.raises(ArtifactRejected) as caught:
        store.path(manifest.artifact_id)
    assert caught.value.reason == "size"
    mkey = store.key(manifest.artifact_id, "manifest.json")
    text = store.client.get_object(Bucket=bucket, Key=mkey)["Body"].read()
    store.client.put_object(Bucket=bucket, Key=mkey, Body=text.replace(b'"1.0.0"', b'"1.0.1"'))
    with pytest.raises(ArtifactRejected) as caught:
        store.path(manifest.artifact_id)
    assert caught.value.reason == "manifest" and "another id" in str(caught.value)


def test_an_upload_cut_before_the_manifest_is_not_visible(tmp_path: Path, keys: tuple[Path, Path],
                                                          s3_endpoint: str, bucket: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The hub dies (here: the PUT fails) after the payload and signature, before manifest.json: the
    artifact is not listed, has no signature, no path, no chunks, for this store and a fresh one; adding
    it again completes it."""
    artifact = make_artifact(tmp_path / "a", keys[0])
    store = s3_store(s3_endpoint, bucket, tmp_path / "cache", keys)
    put = store._put

    def crash_on_manifest(key: str, path: Path) -> None:
        if key.endswith("/manifest.json"):
            raise KeyboardInterrupt("the hub died")
        put(key, path)

    monkeypatch.setattr(store, "_put", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        store.add(artifact)
    monkeypatch.undo()
    uploaded = {str(o["Key"]).rsplit("/", 1)[1] for o in store.client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert uploaded == {"model.onnx", "signature"}  # the payload is there, the manifest is not
    artifact_id = make_manifest_id(artifact, keys)
    for reader in (store, s3_store(s3_endpoint, bucket, tmp_path / "fresh", keys)):
        assert reader.ids() == []
        assert not reader.path(artifact_id).exists()
        with pytest.raises(FileNotFoundError):
            reader.signature(artifact_id)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # no staging left either
    assert store.add(artifact).artifact_id == artifact_id and store.ids() == [artifact_id]


def test_a_download_cut_short_leaves_no_cache_entry(tmp_path: Path, keys: tuple[Path, Path], s3_endpoint: str,
                                                    bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    artifact = make_artifact(tmp_path / "a", keys[0], golden=True)  # two payload files
    store = s3_store(s3_endpoint, bucket, tmp_path / "cache", keys)
    manifest = store.add(artifact)
    fetch, calls = store._fetch, []

    def dies_on_second(key: str, target: Path, size: int) -> None:
        calls.append(key)
        if len(calls) == 2:
            target.write_bytes(b"partial")
            raise ConnectionResetError("connection lost")
        fetch(key, target, size)

    monkeypatch.setattr(store, "_fetch", dies_on_second)
    with pytest.raises(ConnectionResetError):
        store.path(manifest.artifact_id)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    assert (store.path(manifest.artifact_id) / "golden.npz").read_bytes() == (artifact / "golden.npz").read_bytes()


def test_a_rotted_cache_is_healed_from_the_bucket(tmp_path: Path, keys: tuple[Path, Path], s3_endpoint: str,
                                                 bucket: str) -> None:  # fmt: skip
    """A cached file that rots on local disk: read_chunk drops the cache and serves the bucket's chunk."""
    artifact = make_artifact(tmp_path / "a", keys[0])
    store = s3_store(s3_endpoint, bucket, tmp_path / "cache", keys)
    manifest = store.add(artifact)
    cached = store.path(manifest.artifact_id) / "model.onnx"
    cached.write_bytes(flip(cached.read_bytes(), at=5))
    assert store.read_chunk(manifest, 0, 0) == file_chunks(artifact, manifest)[(0, 0)]
    assert list((tmp_path / "cache").iterdir()) == []
    assert (store.path(manifest.artifact_id) / "model.onnx").read_bytes() == (artifact / "model.onnx").read_bytes()


def make_manifest_id(artifact: Path, keys: tuple[Path, Path]) -> str:
    from edge_agent.protocol.artifact import read_manifest

    return read_manifest(artifact, TrustStore.from_dir(keys[1].parent)).artifact_id


def test_settings_and_configuration_errors(tmp_path: Path, keys: tuple[Path, Path], s3_endpoint: str) -> None:
    assert parse_s3_url("s3://b") == ("b", "") and parse_s3_url("s3://b/x/y/") == ("b", "x/y")
    for bad in ("s3://", "s3:///x", "http://b/x"):
        with pytest.raises(ConfigError):
            parse_s3_url(bad)
    config = client_config(s3_endpoint, "eu-west-3")
    assert config.connect_timeout == CONNECT_TIMEOUT_S and config.read_timeout <= 60
    assert config.retries["max_attempts"] <= 5 and config.s3["addressing_style"] == "path"
    trust = TrustStore.from_dir(keys[1].parent)
    with pytest.raises(ConfigError, match="no-such-bucket"):
        open_artifacts(ArtifactLocation("s3://no-such-bucket/x", s3_endpoint), tmp_path, trust)
    with pytest.raises(ConfigError, match="cannot use bucket"):  # nothing listens there: bounded, then refused
        S3ArtifactStore("s3://b", trust, tmp_path / "c", f"http://127.0.0.1:{free_port()}")
    assert isinstance(open_artifacts(ArtifactLocation(), tmp_path, trust), ArtifactStore)
    assert open_artifacts(ArtifactLocation(str(tmp_path / "elsewhere")), tmp_path, trust).path("x").parent == (
        tmp_path / "elsewhere"
    )


# --- a hub on S3 ---------------------------------------------------------------------------------------


def test_a_hub_with_s3_artifacts_registers_serves_inference_and_chunks(
    tmp_path: Path, keys: tuple[Path, Path], s3_endpoint: str, bucket: str, mosquitto: Any
) -> None:
    """An artifact uploaded through the admin API lands in the bucket (not STATE/artifacts); the OIP
    server loads it from there and answers; its chunks read back as sealed; a second hub on the same
    bucket with an empty state directory's cache serves it too."""
    from cloud_hub.api_client import AdminClient
    from cloud_hub.server import Hub, HubConfig, operator_token
    from edge_agent.cloud import CloudClient

    state = tmp_path / "hub"
    (state / "trust").mkdir(parents=True)
    shutil.copy(keys[1], state / "trust")
    location = ArtifactLocation(f"s3://{bucket}/fleet", s3_endpoint)
    hub = Hub(HubConfig(state, broker=mosquitto.url, grpc_port=0, admin_port=0, artifacts=location))
    hub.start()
    try:
        artifact = make_artifact(tmp_path / "a", keys[0])
        admin = AdminClient(f"http://127.0.0.1:{hub.admin.port}", operator_token(state))  # type: ignore[union-attr]
        added = admin.add_artifact(artifact)
        assert added["new"] and not (state / "artifacts").exists()
        assert hub.store.ids() == [added["artifact_id"]]
        x = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
        with CloudClient(f"grpc://127.0.0.1:{hub.grpc_port}") as cloud:
            version, outputs = cloud.infer("gemm", {"input": x}, "1.0.0")
        assert version == "1.0.0" and outputs["output"].shape == (2, 30)
        assert (state / "artifact-cache" / added["artifact_id"] / "model.onnx").is_file()
        manifest = hub.store.add(artifact)
        for (f, c), data in file_chunks(artifact, manifest).items():
            assert hub.store.read_chunk(manifest, f, c) == data
    finally:
        hub.stop()
    other = open_artifacts(location, tmp_path / "other", TrustStore.from_dir(keys[1].parent))
    assert other.ids() == [added["artifact_id"]] and (other.path(added["artifact_id"]) / "model.onnx").is_file()
