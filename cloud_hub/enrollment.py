"""Devices joining and leaving the fleet: enrollment tokens, enrollment (the signed answer a device pins),
bearer tokens for the cloud route, MQTT password rotation and removal. A part of ``Hub`` (its base class),
kept here so that the hub's wiring and its fleet membership read apart (docs/security.md, "Enrollment")."""

from __future__ import annotations

import secrets
import threading
import time
from typing import TYPE_CHECKING, Any

from cloud_hub.auth import ACTOR
from cloud_hub.enroll_grants import ReenrollGrants, key_fingerprint, sign_answer
from cloud_hub.errors import NotFound
from cloud_hub.inference import token_hash
from cloud_hub.mqtt_auth import MqttUsers, reserved
from device_profiles import get_profile
from edge_agent.protocol.topics import Topics, valid_device_id

if TYPE_CHECKING:
    from cloud_hub.control import ControlPlane
    from cloud_hub.desired_signing import DesiredSigner
    from cloud_hub.hub_config import HubConfig
    from cloud_hub.keys import HubKeys
    from cloud_hub.registry import Registry


class DeviceEnrollment:
    """What ``Hub`` sets up in ``__init__``/``start`` and these methods use."""

    config: HubConfig
    registry: Registry
    topics: Topics
    keys: HubKeys
    desired_signer: DesiredSigner
    reenroll: ReenrollGrants
    mqtt_users: MqttUsers
    control: ControlPlane | None
    broker_url: str
    grpc_port: int
    _enrolling: threading.Lock

    def issue_token(self, device_id: str) -> dict[str, Any]:
        token = secrets.token_urlsafe(32)
        self.registry.add_device_token(device_id, token_hash(token))
        self.registry.audit(ACTOR.get(), "devices.token", {"device_id": device_id})
        return {"device_id": device_id, "token": token}

    def enroll_token(self, groups: list[str], tags: dict[str, str], ttl_s: float,
                     reenroll: str | None = None) -> dict[str, Any]:  # fmt: skip
        """A single-use enrollment token that expires after ``ttl_s``; devices enrolled with it join
        ``groups`` and get ``tags``. It enrolls only a new device id, or with ``reenroll`` exactly that
        existing one. The token is ``SECRET.FINGERPRINT``: the fingerprint pins the hub key the device
        must find in the signed answer (docs/security.md)."""
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        if reenroll is not None:
            self.registry.device(reenroll)  # NotFound: nothing to re-enroll
        secret = secrets.token_urlsafe(24)
        expires = time.time() + ttl_s
        self.registry.add_enroll_token(token_hash(secret), expires, groups, tags)
        if reenroll is not None:
            self.reenroll.add(token_hash(secret), reenroll)
        self.registry.audit(ACTOR.get(), "devices.enroll-token",
                            {"groups": groups, "tags": tags, "expires": expires, "reenroll": reenroll})  # fmt: skip
        fingerprint = key_fingerprint(self.desired_signer.key.public_key())
        return {"token": f"{secret}.{fingerprint}", "fingerprint": fingerprint, "expires": expires,
                "groups": groups, "tags": tags, "reenroll": reenroll}  # fmt: skip

    def enroll(self, token: str, device_id: str, profile: str) -> dict[str, Any]:
        """Register a device with a valid enrollment token; returns what the agent needs to run, signed
        with the hub key (``answer_signature``) and bound to the token (``token_sha256``)."""
        if not valid_device_id(device_id):
            raise ValueError(f"device_id {device_id!r}: use letters, digits, '.', '_' and '-'")
        if reserved(device_id):
            raise ValueError(f"device_id {device_id!r} is reserved for the hub's own MQTT user; choose another")
        get_profile(profile)  # ProfileError → 400 naming the known ids
        digest = token_hash(token.partition(".")[0])  # a token given with its fingerprint is the same token
        with self._enrolling:  # no second enrollment of the same id between the check and the registration
            allowed = self.reenroll.device_for(digest)
            if allowed is not None and allowed != device_id:
                raise PermissionError(f"this enrollment token re-enrolls only {allowed!r}, not {device_id!r}")
            if allowed is None and self._known(device_id):
                raise PermissionError(f"device {device_id!r} is already enrolled and this token enrolls only new "
                                      f"devices; to re-enroll it, issue a token with 'cloud-hub devices "
                                      f"enroll-token --reenroll {device_id}'")  # fmt: skip
            grant = self.registry.use_enroll_token(digest, device_id)
            if grant is None:
                raise PermissionError("enrollment token unknown, already used or expired; ask for a new one")
            self.registry.upsert_device(device_id, profile=profile, groups=grant["groups"], tags=grant["tags"],
                                        enrolled=time.time(), status="enrolled")  # fmt: skip
        self.registry.audit(device_id, "enroll", {"profile": profile, "reenroll": allowed is not None, **grant})
        trusted = self.keys.trusted_pems()  # for agents older than key sets; newer ones install "keyset"
        answer = {
            "device_id": device_id, "profile": profile, "topic_root": self.config.topic_root,
            "broker": self.config.public_broker or self.broker_url,
            "cloud": self._cloud_url(),
            "cloud_token": self.issue_token(device_id)["token"], "trusted_keys": trusted,
            "keyset": self.keys.keyset.envelope,  # signed by the hub key: the device's trust comes from it
            "hub_key": self.desired_signer.public_pem,  # desired states are signed with it (docs/security.md)
            "token_sha256": digest,  # binds the signed answer to this enrollment
            # its MQTT user: a new password each (re-)enrollment, the old one stops working; the hub keeps a hash
            "mqtt_username": device_id, "mqtt_password": self.mqtt_users.issue(device_id),
        }  # fmt: skip
        return sign_answer(answer, self.desired_signer.key)

    def _known(self, device_id: str) -> bool:
        try:
            self.registry.device(device_id)
        except NotFound:
            return False
        return True

    def rotate_mqtt_password(self, device_id: str) -> dict[str, Any]:
        """A new MQTT password for an enrolled device; the old one stops working at once. The device needs
        the new one: re-enroll it (``enroll-token --reenroll``) or ``edge-agent init --mqtt-password-file``."""
        self.registry.device(device_id)  # NotFound for an unknown device
        password = self.mqtt_users.issue(device_id)
        self.registry.audit(ACTOR.get(), "devices.rotate-mqtt", {"device_id": device_id})
        return {"device_id": device_id, "mqtt_username": device_id, "mqtt_password": password}

    def remove_device(self, device_id: str) -> dict[str, Any]:
        self.registry.remove_device(device_id)
        self.mqtt_users.remove(device_id)  # it cannot connect any more (docs/security.md)
        if self.control is not None:  # clear its retained messages on the broker
            for topic in (self.topics.desired, self.topics.reported, self.topics.status, self.topics.keyset):
                self.control.mqtt.publish(topic(device_id), b"", retain=True)
        self.registry.audit(ACTOR.get(), "devices.remove", {"device_id": device_id})
        return {"device_id": device_id, "removed": True}

    def _cloud_url(self) -> str:
        """The cloud endpoint enrolled devices get: ``--public-grpc``, else this hub's gRPC port (grpcs://
        when it serves TLS)."""
        scheme = "grpcs" if self.config.inference.tls_cert else "grpc"
        return self.config.public_grpc or f"{scheme}://{self.config.grpc_host}:{self.grpc_port}"
