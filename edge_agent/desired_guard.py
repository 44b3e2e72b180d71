"""Which desired states a device follows: the hub's signature and a counter that only grows.

    STATE/hub-keys/*.pub        the hub's desired-state keys (from enrollment, or `init --hub-key`);
                                NOT trust/, which authorises artifacts. Once the device holds a signed
                                key set (STATE/keyset.json, trust.py), its hub keys are used instead
    STATE/desired-guard.json    {"counter", "decision"} of the last desired state accepted (write-fsync-rename)
    STATE/local-overrides.json  {NAME: {"version", "artifact_id", "at"}}: active versions switched on the
                                device (edge-agent rollback/activate) since the last desired state

A device with a hub key accepts only desired states signed by it for this device, with a counter above the
last one accepted — or equal to it for the very same decision (the retained copy delivered again after a
reconnection, or the hub publishing it again after a restart: it keeps the signed message). The counter is
written before anything is applied, so a crash in between replays nothing older. A device with no hub key
(an older enrollment, a manual setup without ``--hub-key``) follows unsigned desired states as before, and
never honours a ``rollback`` flag: only a verified signature authorises a release below the installed one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm

from edge_agent.protocol.atomic import atomic_write_bytes
from edge_agent.protocol.canonical import canonical_json
from edge_agent.protocol.desired_signing import verify_desired
from edge_agent.protocol.errors import DesiredStateRefused
from edge_agent.protocol.manifest import now_text
from edge_agent.protocol.messages import DesiredModel, DesiredState, ReportedModel, from_wire
from edge_agent.protocol.signing import TrustStore, public_key_from_pem
from edge_agent.store import ActiveRecord

log = logging.getLogger(__name__)
HUB_KEYS_DIR = "hub-keys"
HUB_KEY_FILE = "hub.pub"
GUARD_FILE = "desired-guard.json"
OVERRIDES_FILE = "local-overrides.json"


@dataclass(frozen=True)
class Accepted:
    """A desired state to follow. ``signed``: verified with a hub key (a ``rollback`` flag counts only
    then); ``repeat``: the decision already accepted last time (local overrides stand)."""

    state: DesiredState
    signed: bool
    repeat: bool


def install_hub_key(state_dir: Path, pem: bytes) -> Path:
    """Store the hub's public key as ``hub-keys/hub.pub``; ValueError, leaving any installed key as it is,
    when ``pem`` is not an Ed25519 public key (PEM)."""
    try:
        public_key_from_pem(pem)
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("the hub key is not an Ed25519 public key (PEM); use the hub's hub-key/hub.pub") from None
    directory = state_dir / HUB_KEYS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / HUB_KEY_FILE
    atomic_write_bytes(path, pem)
    return path


def decision(state: DesiredState) -> str:
    """Names what a desired state decides: its signature when signed (one per signed message), else its
    deployment and models (an unsigned state is republished with a new ``issued_at``)."""
    if state.signature:
        return hashlib.sha256(canonical_json(state.signature)).hexdigest()[:32]
    models = [[m.name, m.artifact_id, m.rollback] for m in state.models]
    return hashlib.sha256(canonical_json([state.deployment_id, models])).hexdigest()[:32]


class DesiredGuard:
    def __init__(self, state_dir: Path, device_id: str) -> None:
        self.state_dir, self.device_id = state_dir, device_id
        from edge_agent.trust import hub_trust  # (trust.py imports this module)

        self.hub_keys: TrustStore = hub_trust(state_dir)  # the key set's hub keys; hub-keys/ while none is held
        self.path = state_dir / GUARD_FILE
        self.counter, self.decision = self._load()

    @property
    def required(self) -> bool:
        """Whether desired states must be signed by the hub (a hub key is installed)."""
        return bool(self.hub_keys.keys)

    def _load(self) -> tuple[int, str]:
        try:
            data = json.loads(self.path.read_bytes())
            return int(data["counter"]), str(data["decision"])
        except FileNotFoundError:
            return 0, ""
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # never fall back to 0: that would accept any replay. The hub's counters are at least its clock
            # in ms when signed, so only desired states the hub decides from now on are accepted
            log.error("%s is unreadable (%s): accepting only desired states the hub decides from now on "
                      "(deploy or roll back again to reach this device)", self.path, exc)  # fmt: skip
            return int(time.time() * 1000), ""

    def accept(self, payload: bytes) -> Accepted:
        """Check ``payload``; MessageError (malformed) or DesiredStateRefused (naming why) when it must not
        be followed. A newly accepted counter is stored crash-safely before this returns (after clearing the
        local overrides of the models the new decision names)."""
        if not self.required:
            state = from_wire(DesiredState, payload)
            key = decision(state)
            repeat = key == self.decision
            if not repeat:
                self._store(state, self.counter, key)
            return Accepted(state, signed=False, repeat=repeat)
        state = verify_desired(payload, self.hub_keys, self.device_id)
        key = decision(state)
        if state.counter == self.counter and key == self.decision:
            return Accepted(state, signed=True, repeat=True)
        if state.counter <= self.counter:
            raise DesiredStateRefused(
                f"desired state refused: counter {state.counter} is not above {self.counter}, the last one "
                "this device accepted (a replayed or older desired state); the installed models are unchanged"
            )
        self._store(state, state.counter, key)
        return Accepted(state, signed=True, repeat=False)

    def _store(self, state: DesiredState, counter: int, key: str) -> None:
        """Accept a new decision: it replaces the local overrides of the models it names, cleared first, so
        a crash before the counter is stored leaves none standing against this decision delivered again."""
        clear_overrides(self.state_dir, {m.name for m in state.models})
        atomic_write_bytes(self.path, json.dumps({"counter": counter, "decision": key, "at": now_text()}).encode())
        self.counter, self.decision = counter, key


def read_overrides(state_dir: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((state_dir / OVERRIDES_FILE).read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_override(state_dir: Path, name: str, version: str, artifact_id: str) -> None:
    """A local switch of ``name``'s active version (edge-agent rollback/activate, or seen by the daemon)."""
    found = read_overrides(state_dir)
    found[name] = {"version": version, "artifact_id": artifact_id, "at": now_text()}
    atomic_write_bytes(state_dir / OVERRIDES_FILE, json.dumps(found).encode())


def clear_overrides(state_dir: Path, names: set[str]) -> None:
    """A new desired state replaces the local switches of the models it names."""
    found = read_overrides(state_dir)
    if names & set(found):
        kept = {k: v for k, v in found.items() if k not in names}
        atomic_write_bytes(state_dir / OVERRIDES_FILE, json.dumps(kept).encode())


def models_to_follow(
    accepted: Accepted, state_dir: Path, active: Callable[[str], ActiveRecord | None]
) -> tuple[list[DesiredModel], dict[str, ReportedModel]]:
    """(the models to converge, reports of the models a local override keeps as they are).

    A ``rollback`` flag outside a hub-signed state is dropped (the version then meets the downgrade
    check). A new decision replaces every local override of the models it names; the same decision
    delivered again (a reconnection, a hub restart) leaves a model whose active version was switched on
    the device since as it is: the hub's signed desired state is the source of truth, and a local
    rollback stands, reported as ``origin: local``, until the hub decides again."""
    overrides = read_overrides(state_dir) if accepted.repeat else {}  # a new decision cleared them (accept)
    follow, kept = [], {}
    for model in accepted.state.models:
        if model.rollback and not accepted.signed:
            log.warning("%s@%s: a rollback flag in a desired state this device cannot verify (no hub key in "
                        "%s/) is ignored; the version must pass the downgrade check", model.name, model.version,
                        HUB_KEYS_DIR)  # fmt: skip
            model = dataclasses.replace(model, rollback=False)
        record = active(model.name)
        override = overrides.get(model.name)
        if override and record is not None and record.artifact_id == override.get("artifact_id") != model.artifact_id:
            kept[model.name] = ReportedModel(model.name, "active", record.version, record.artifact_id, origin="local")
            continue
        follow.append(model)
    return follow, kept
