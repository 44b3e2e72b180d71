"""The hub's side of the signed key set (edge_agent/protocol/keyset.py): which artifact-signing keys the
fleet trusts, which are revoked, and the hub key that signs it all; ``cloud-hub keys list|add|revoke|rotate``.

The first start makes version 1: the hub key as root, ``STATE/trust/*.pub`` as the artifact keys. Later
starts add any new key put in ``trust/`` (``cloud-hub serve --trust``) unless it is revoked. Every change
is a new version signed by the hub key (a rotation: by the old and the new one), stored crash-safely
(cloud_hub/keyset_files.py), then made the hub's own upload trust (``models add`` refuses a revoked key)
and published to every device, retained on ``devices/{id}/keyset``: the roots' chain and the newest.
A device reporting an older ``keyset_version`` is sent it again (at most every 30 s).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cloud_hub.desired_signing import hub_key, hub_public_pem
from cloud_hub.enroll_grants import key_fingerprint
from cloud_hub.errors import Conflict, NotFound
from cloud_hub.keyset_files import KeySetFiles
from edge_agent.protocol.errors import MessageError
from edge_agent.protocol.keyset import KeySet, build, parse, public_pem, sign, to_message
from edge_agent.protocol.manifest import now_text
from edge_agent.protocol.messages import ReportedState, from_wire
from edge_agent.protocol.signing import TrustStore, key_id, public_key_from_pem

if TYPE_CHECKING:
    from cloud_hub.artifacts import Artifacts
    from cloud_hub.control import ControlPlane
    from cloud_hub.desired_signing import DesiredSigner
    from cloud_hub.registry import Registry

log = logging.getLogger(__name__)
REPUBLISH_EVERY_S = 30.0


class HubKeys:
    def __init__(self, state_dir: Path, registry: Registry, store: Artifacts) -> None:
        """Finish an interrupted rotation, then load (or make) the key set; before the hub key is loaded
        by anything else. ValueError when the hub key is not a root of the key set in force."""
        self.state_dir, self.registry, self.store = state_dir, registry, store
        self.files = KeySetFiles(state_dir)
        self.files.finish_rotation()
        self.key = hub_key(state_dir)
        self.signer: DesiredSigner | None = None  # re-keyed on rotation (the hub sets it)
        self.control: ControlPlane | None = None  # publishes (``start``)
        self._lock = threading.RLock()
        self._sent: dict[str, float] = {}  # device → when the key set was last sent to it on a lagging report
        current = self.files.current()
        if current is None:  # version 1: the hub key, and the keys of trust/ (serve --trust)
            root = key_id(self.key.public_key())
            trusted = {k: v for k, v in TrustStore.from_dir(state_dir / "trust").keys.items() if k != root}
            current = self._save(self._signed(1, [self.key.public_key()], trusted, set(), [self.key]), True)
        elif key_id(self.key.public_key()) not in current.roots:
            raise ValueError(f"the hub key in {state_dir / 'hub-key'} is not a hub key of the key set in force "
                             f"({state_dir / 'keyset'}); restore hub-key/ from a backup")  # fmt: skip
        self.keyset = current
        self._import_trust_dir()
        self.store.trust = self.keyset.artifact_trust()

    # building and storing --------------------------------------------------------------------------
    @staticmethod
    def _signed(version: int, roots: list[Ed25519PublicKey], keys: dict[str, Ed25519PublicKey], revoked: set[str],
                signers: list[Ed25519PrivateKey]) -> KeySet:  # fmt: skip
        return parse(sign(build(version, now_text(), roots, keys.values(), revoked), signers))

    def _save(self, keyset: KeySet, roots_changed: bool = False) -> KeySet:
        self.files.save(keyset, roots_changed)
        self.keyset = keyset
        self.store.trust = keyset.artifact_trust()
        return keyset

    def _next(self, keys: dict[str, Ed25519PublicKey], revoked: set[str]) -> KeySet:
        """The next version with these artifact keys and revocations, signed by the hub key; stored, published."""
        current = self.keyset
        made = self._signed(current.version + 1, list(current.roots.values()), keys, revoked, [self.key])
        self._save(made)
        self.publish_all()
        return made

    def _import_trust_dir(self) -> None:
        """Keys put in ``STATE/trust`` (``serve --trust``) the key set does not hold yet join it."""
        found = TrustStore.from_dir(self.state_dir / "trust").keys
        new = {k: v for k, v in found.items() if k not in self.keyset.keys and k not in self.keyset.roots}
        for kid in sorted(set(new) & self.keyset.revoked):
            log.warning("trust/ holds revoked key %s: not trusted (revoked keys are never reinstated)", kid)
            del new[kid]
        if new:
            self._next({**self.keyset.keys, **new}, set(self.keyset.revoked))
            log.info("key set version %d: added %s from trust/", self.keyset.version, ", ".join(sorted(new)))

    # what operators call ----------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The key set in force: version, hub keys, trusted keys, revoked ids, and the signed document."""
        with self._lock:
            current = self.keyset
        roots = sorted(current.roots.items())
        return {"version": current.version, "issued_at": current.issued_at,
                "hub_keys": [{"key_id": k, "fingerprint": key_fingerprint(v)} for k, v in roots],
                "keys": [{"key_id": k, "public_key": public_pem(v)} for k, v in sorted(current.keys.items())],
                "revoked": sorted(current.revoked), "keyset": current.envelope}  # fmt: skip

    def add(self, pem: str) -> dict[str, Any]:
        """Trust one more artifact-signing key (a ``model-compiler keygen`` .pub)."""
        if "PRIVATE KEY-----" in pem:
            raise ValueError("that is a private key; give the .pub (keep private keys off the hub)")
        try:
            public = public_key_from_pem(pem.encode(), "public_key")
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ValueError("public_key: not an Ed25519 public key in PEM (model-compiler keygen's .pub)") from None
        kid = key_id(public)
        with self._lock:
            current = self.keyset
            if kid in current.revoked:
                raise Conflict(f"key {kid} is revoked and is never trusted again; make a new one with "
                               "'model-compiler keygen'")  # fmt: skip
            if kid in current.roots:
                raise Conflict(f"key {kid} is the hub key: it signs key sets and desired states, never artifacts")
            if kid in current.keys:
                return {"key_id": kid, "version": current.version, "added": False}
            made = self._next({**current.keys, kid: public}, set(current.revoked))
        return {"key_id": kid, "version": made.version, "added": True}

    def revoke(self, kid: str) -> dict[str, Any]:
        """Stop trusting an artifact-signing key, for good: artifacts it signed are refused from now on."""
        with self._lock:
            current = self.keyset
            if kid in current.revoked:
                raise Conflict(f"key {kid} is already revoked")
            if kid in current.roots:
                raise Conflict(f"key {kid} is the hub key: replace it with 'cloud-hub keys rotate'")
            if kid not in current.keys:
                raise NotFound(f"no trusted key {kid!r}; see 'cloud-hub keys list'")
            keys = {k: v for k, v in current.keys.items() if k != kid}
            made = self._next(keys, {*current.revoked, kid})
        return {"key_id": kid, "version": made.version, "revoked": True}

    def rotate(self) -> dict[str, Any]:
        """A new hub key: the key set signed by the old and the new key (devices take it with the old one),
        the old key retired (revoked, its file replaced); desired states are signed again with the new key."""
        with self._lock:
            current, old = self.keyset, self.key
            new = self.files.new_hub_key()
            revoked = {*current.revoked, *current.roots}  # a retired hub key is never a root again
            made = self._signed(current.version + 1, [new.public_key()], dict(current.keys), revoked, [old, new])
            try:
                self._save(made, roots_changed=True)  # the commit
            except BaseException:  # not committed (a full disk ...): the new key and its root file go
                self.keyset = current
                self.files.finish_rotation()
                raise
            self.files.promote_next()
            self.key = hub_key(self.state_dir)
            if self.signer is not None:
                self.signer.rekey(self.key, hub_public_pem(self.state_dir))
        self.publish_all()
        if self.control is not None:
            self.control.republish_desired()  # signed again with the new key, under new counters
        return {"version": made.version, "key_id": key_id(self.key.public_key()),
                "fingerprint": key_fingerprint(self.key.public_key()),
                "retired_key_id": key_id(old.public_key())}  # fmt: skip

    def trusted_pems(self) -> list[str]:
        """The artifact keys in force as PEM (the enrollment answer's ``trusted_keys``, for older agents)."""
        return [public_pem(v) for _, v in sorted(self.keyset.artifact_trust().keys.items())]

    # publishing --------------------------------------------------------------------------------------
    def start(self, control: ControlPlane) -> None:
        """Publish to every known device now, and again to any that reports an older key set."""
        self.control = control
        control.device_route("reported", self._on_reported)
        self.publish_all()

    def message(self) -> bytes:
        """The retained message: the roots' chain, then the key set in force (when not already last)."""
        with self._lock:
            chain = [c for c in self.files.chain() if parse(c).version <= self.keyset.version]  # never above
            if not chain or parse(chain[-1]).version != self.keyset.version:
                chain.append(self.keyset.envelope)
        return to_message(chain)

    def publish(self, device_id: str, message: bytes | None = None) -> None:
        if self.control is not None:
            payload = message if message is not None else self.message()
            self.control.mqtt.publish(self.control.topics.keyset(device_id), payload, qos=1, retain=True)

    def publish_all(self) -> None:
        if self.control is None:
            return
        message = self.message()
        for device in self.registry.devices():
            try:
                self.publish(device["device_id"], message)
            except Exception:  # one device must not keep the others from theirs
                log.exception("cannot publish the key set to %s", device["device_id"])

    def _on_reported(self, topic: str, payload: bytes) -> None:
        if not payload or self.control is None:
            return
        try:
            state = from_wire(ReportedState, payload)
        except MessageError:  # the control plane counts it as malformed
            return
        parsed = self.control.topics.parse_device_topic(topic)
        if parsed is None or state.device_id != parsed[0] or state.keyset_version >= self.keyset.version:
            return
        try:
            self.registry.device(parsed[0])  # only enrolled devices get (and are re-sent) the key set
        except NotFound:
            return
        now = time.monotonic()
        if now - self._sent.get(parsed[0], -REPUBLISH_EVERY_S) >= REPUBLISH_EVERY_S:
            self._sent[parsed[0]] = now
            self.publish(parsed[0])
