"""The artifact contract: signing, hashes, expiry and release checks; refusals leave the store untouched."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from conftest import make_artifact, tree_digest

from device_profiles import get_profile
from edge_agent import EdgeClient
from edge_agent.errors import InputMismatch
from edge_agent.protocol.artifact import read_manifest, verify_chunk
from edge_agent.protocol.canonical import canonical_json
from edge_agent.protocol.errors import ArtifactRejected
from edge_agent.protocol.messages import Chunk, DesiredState, MessageError, from_wire
from edge_agent.protocol.signing import TrustStore, generate_keypair
from edge_agent.store import ModelStore

PROFILE = get_profile("x86-64-generic")


def test_canonical_json_is_order_independent() -> None:
    assert canonical_json({"b": 1, "a": [1, 2]}) == canonical_json({"a": [1, 2], "b": 1}) == b'{"a":[1,2],"b":1}'


def test_install_activate_and_infer(
    tmp_path: Path, keys: tuple[Path, Path], device: tuple[Path, ModelStore, TrustStore]
) -> None:
    state, store, trust = device
    artifact = make_artifact(tmp_path / "a1", keys[0])
    manifest = store.install(artifact, trust, PROFILE)
    store.activate(manifest.name, manifest.version)
    assert len(manifest.files[0].chunks) > 1  # small chunks: the per-chunk hashes are exercised
    with EdgeClient(state, telemetry=False) as client:
        x = np.ones((3, 32), np.float32)
        result = client.infer("gemm", {"input": x})
        assert result.route == "local" and result.version == "1.0.0"
        assert result.outputs["output"].shape == (3, 30)
        with pytest.raises(InputMismatch, match=r"'input'.*float32.*float64"):
            client.infer("gemm", {"input": x.astype(np.float64)})
        with pytest.raises(InputMismatch, match="32"):
            client.infer("gemm", {"input": np.ones((3, 31), np.float32)})
    with EdgeClient(state, telemetry=False, allow_cast=True) as client:  # opted in: float64 is cast
        cast = client.infer("gemm", {"input": x.astype(np.float64)})
        np.testing.assert_allclose(cast.outputs["output"], result.outputs["output"], rtol=1e-6)
        with pytest.raises(InputMismatch):  # never an unsafe cast
            client.infer("gemm", {"input": x.astype(np.complex64)})


def _tamper_manifest(artifact: Path) -> None:
    doc = json.loads((artifact / "manifest.json").read_text())
    doc["release"] = 99
    (artifact / "manifest.json").write_text(json.dumps(doc))


def _tamper_chunk(artifact: Path) -> None:
    data = bytearray((artifact / "model.onnx").read_bytes())
    data[2000] ^= 0xFF  # inside the second 1 KiB chunk
    (artifact / "model.onnx").write_bytes(bytes(data))


def _truncate(artifact: Path) -> None:
    data = (artifact / "model.onnx").read_bytes()
    (artifact / "model.onnx").write_bytes(data[:-10])


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [(_tamper_manifest, "signature"), (_tamper_chunk, "chunk"), (_truncate, "size")],
    ids=["tampered-manifest", "tampered-chunk", "truncated-file"],
)
def test_tampered_artifact_is_refused_and_store_unchanged(
    tmp_path: Path,
    keys: tuple[Path, Path],
    device: tuple[Path, ModelStore, TrustStore],
    tamper: object,
    reason: str,
) -> None:
    state, store, trust = device
    first = store.install(make_artifact(tmp_path / "a1", keys[0]), trust, PROFILE)
    store.activate(first.name, first.version)
    before = tree_digest(state)
    bad = make_artifact(tmp_path / "a2", keys[0], version="2.0.0", release=2, seed=1)
    tamper(bad)  # type: ignore[operator]
    with pytest.raises(ArtifactRejected) as info:
        store.install(bad, trust, PROFILE)
    assert info.value.reason == reason
    assert tree_digest(state) == before


def test_wrong_key_expired_and_downgrade_are_refused(
    tmp_path: Path, keys: tuple[Path, Path], device: tuple[Path, ModelStore, TrustStore]
) -> None:
    state, store, trust = device
    current = store.install(make_artifact(tmp_path / "a5", keys[0], version="5.0.0", release=5), trust, PROFILE)
    store.activate(current.name, current.version)
    before = tree_digest(state)
    other_key, _ = generate_keypair(tmp_path / "other")
    cases = {
        "signature": make_artifact(tmp_path / "wrong-key", other_key, version="6.0.0", release=6),
        "expired": make_artifact(
            tmp_path / "expired", keys[0], version="7.0.0", release=7, expires_in=timedelta(seconds=-1)
        ),
        "downgrade": make_artifact(tmp_path / "older", keys[0], version="4.0.0", release=4),
        "profile": make_artifact(tmp_path / "jetson", keys[0], version="8.0.0", release=8, profile="jetson-agx-orin"),
    }
    for reason, artifact in cases.items():
        if reason == "profile":  # a Jetson artifact: rewrite its hardware and re-sign would be a new artifact
            doc = json.loads((artifact / "manifest.json").read_text())
            assert doc["hardware"]["profile"] == "jetson-agx-orin"
        with pytest.raises(ArtifactRejected) as info:
            store.install(artifact, trust, PROFILE if reason != "profile" else get_profile("raspberry-pi-5"))
        assert info.value.reason == reason, reason
        assert tree_digest(state) == before, reason
    assert store.active("gemm").version == "5.0.0"  # type: ignore[union-attr]


def test_rollback_and_retention(
    tmp_path: Path, keys: tuple[Path, Path], device: tuple[Path, ModelStore, TrustStore]
) -> None:
    _, store, trust = device
    for release in range(1, 6):
        m = store.install(
            make_artifact(tmp_path / f"r{release}", keys[0], version=f"{release}.0.0", release=release, seed=release),
            trust,
            PROFILE,
        )
        store.activate(m.name, m.version)
    assert store.active("gemm").version == "5.0.0"  # type: ignore[union-attr]
    assert len(store.versions("gemm")) == 3
    assert store.rollback("gemm").version == "4.0.0"


def test_chunk_and_message_decoding(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    artifact = make_artifact(tmp_path / "a", keys[0])
    manifest = read_manifest(artifact, TrustStore.from_dir(keys[1].parent))
    data = (artifact / "model.onnx").read_bytes()[:1024]
    chunk = Chunk.from_wire(Chunk(0, 0, data).to_wire())
    verify_chunk(manifest, chunk.file_index, chunk.chunk_index, chunk.data)
    with pytest.raises(ArtifactRejected, match="chunk"):
        verify_chunk(manifest, 0, 1, data)
    with pytest.raises(MessageError):
        Chunk.from_wire(b"junk")
    with pytest.raises(MessageError, match=r"DesiredState\.models"):
        from_wire(DesiredState, b'{"deployment_id": "d", "issued_at": "t", "models": 3}')
    with pytest.raises(MessageError):
        from_wire(DesiredState, b'{"deployment_id": "d", "deployment_id": "e", "issued_at": "t"}')
