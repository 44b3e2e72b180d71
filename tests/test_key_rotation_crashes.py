"""A hub-key rotation cut short at its worst moments (issue 14): a commit that fails half-way, a torn
new key file, and a crash after the commit but before desired states were signed again. The hub must
come back trusting only keys it holds, and never send a desired state signed by a retired key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from cloud_hub.desired_signing import HUB_KEY_DIR, DesiredSigner
from cloud_hub.keys import HubKeys
from cloud_hub.keyset_files import KeySetFiles
from cloud_hub.workers import open_store
from edge_agent.protocol.keyset import from_message
from edge_agent.protocol.manifest import now_text
from edge_agent.protocol.messages import DesiredState
from edge_agent.protocol.signing import generate_keypair, key_id


def hub_state(tmp_path: Path, keys: tuple[Path, Path]) -> tuple[Path, Any, Any]:
    state = tmp_path / "hub"
    (state / "trust").mkdir(parents=True)
    shutil.copy(keys[1], state / "trust")
    registry, store = open_store(state)
    return state, registry, store


def test_a_rotation_whose_commit_fails_is_undone(tmp_path: Path, keys: tuple[Path, Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    state, registry, store = hub_state(tmp_path, keys)
    hub_keys = HubKeys(state, registry, store)
    before, old = hub_keys.keyset, key_id(hub_keys.key.public_key())
    real_save = KeySetFiles.save

    def disk_full(files: KeySetFiles, keyset: Any, roots_changed: bool) -> None:
        files.dir.mkdir(parents=True, exist_ok=True)  # the root file is written, current.json is not
        (files.dir / f"root-{keyset.version:06d}.json").write_bytes(json.dumps(keyset.envelope).encode())
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(KeySetFiles, "save", disk_full)
    with pytest.raises(OSError):
        hub_keys.rotate()
    monkeypatch.setattr(KeySetFiles, "save", real_save)
    assert hub_keys.keyset == before and key_id(hub_keys.key.public_key()) == old
    assert not list((state / HUB_KEY_DIR).glob("hub-next*"))
    assert [p.name for p in (state / "keyset").glob("root-*.json")] == ["root-000001.json"]  # no orphan
    hub_keys.add((generate_keypair(tmp_path / "k2")[1]).read_text())  # the next version is an ordinary one
    chain = from_message(hub_keys.message())
    assert [k.version for k in chain] == [1, 2] and set(chain[-1].roots) == {old}
    restarted = HubKeys(state, registry, store)
    assert key_id(restarted.key.public_key()) == old and restarted.keyset.version == 2


def test_a_torn_new_key_file_does_not_stop_the_hub(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    state, registry, store = hub_state(tmp_path, keys)
    old = key_id(HubKeys(state, registry, store).key.public_key())
    (state / HUB_KEY_DIR / "hub-next.pub").write_bytes(b"")  # power lost while it was written
    restarted = HubKeys(state, registry, store)
    assert key_id(restarted.key.public_key()) == old
    assert not list((state / HUB_KEY_DIR).glob("hub-next*"))


def test_after_a_crash_before_re_signing_no_message_signed_by_the_retired_key_is_sent(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    state, registry, store = hub_state(tmp_path, keys)
    db = str(state / "registry.db")
    hub_keys = HubKeys(state, registry, store)
    signer = DesiredSigner(state, db)
    desired = DesiredState("d1", now_text(), ())
    first = json.loads(signer.payload("dev-1", desired))
    assert first["signature"]["key_id"] == key_id(hub_keys.key.public_key())
    hub_keys.rotate()  # no signer attached: as if the hub died after the commit, before rekey
    signer.close()
    after_restart = DesiredSigner(state, db)  # loads the promoted key
    again = json.loads(after_restart.payload("dev-1", desired))
    assert again["signature"]["key_id"] == key_id(hub_keys.key.public_key()) != first["signature"]["key_id"]
    assert again["counter"] > first["counter"]
    assert json.loads(after_restart.payload("dev-1", desired)) == again  # and then repeated as it is
    after_restart.close()
