"""The MQTT topic tree. Everything a device publishes or reads is under ``devices/{id}/`` except the
read-only ``artifacts/{id}/chunks`` topic that carries chunks to every device fetching that artifact, so
a broker ACL confines a device: ``pattern read {root}/devices/%u/#`` + ``pattern read {root}/artifacts/#``
and ``pattern write`` on its own device → hub leaves only (cloud_hub/mqtt_auth.py, docs/security.md).

    {root}/devices/{device}/desired         hub → device   retained, QoS 1: the models it should run
    {root}/devices/{device}/desired/get     device → hub   QoS 1: send my desired state again
    {root}/devices/{device}/reported        device → hub   retained, QoS 1: what it runs
    {root}/devices/{device}/status          device → hub   retained: online / offline (Last Will)
    {root}/devices/{device}/fetch           device → hub   QoS 1: chunks it still needs
    {root}/devices/{device}/telemetry       device → hub   QoS 1: aggregated windows with a sequence
    {root}/devices/{device}/telemetry/ack   hub → device   QoS 1: highest sequence stored
    {root}/devices/{device}/examples        device → hub   QoS 1: one opt-in hard example (binary EFX1)
    {root}/devices/{device}/examples/ack    hub → device   QoS 1: that example is stored (or refused)
    {root}/devices/{device}/chunks/{artifact}  hub → device  QoS 1: a chunk few others still need
    {root}/devices/{device}/keyset          hub → device   retained, QoS 1: the signed key set (keyset.py)
    {root}/artifacts/{artifact}/chunks      hub → devices  QoS 1: one binary chunk per message
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_ROOT = "edgefed/v1"
# Hub replicas consume device → hub topics through this MQTT shared subscription group: the broker hands
# each message to one replica of the group (``$share/{group}/{filter}``; Mosquitto 2, EMQX, HiveMQ).
HUB_SHARE_GROUP = "edgefed-hubs"


def shared(topic_filter: str, group: str = HUB_SHARE_GROUP) -> str:
    """The shared subscription of ``group`` to ``topic_filter``."""
    return f"$share/{group}/{topic_filter}"


_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def valid_device_id(device_id: str) -> bool:
    """Device ids are used as topic levels and broker user names: no wildcards, slashes or spaces."""
    return bool(_ID_RE.match(device_id))


@dataclass(frozen=True)
class Topics:
    root: str = DEFAULT_ROOT

    def device(self, device_id: str, leaf: str) -> str:
        if not valid_device_id(device_id):
            raise ValueError(f"invalid device id {device_id!r}: use letters, digits, '.', '_' and '-'")
        return f"{self.root}/devices/{device_id}/{leaf}"

    def desired(self, device_id: str) -> str:
        return self.device(device_id, "desired")

    def desired_get(self, device_id: str) -> str:
        return self.device(device_id, "desired/get")

    def reported(self, device_id: str) -> str:
        return self.device(device_id, "reported")

    def status(self, device_id: str) -> str:
        return self.device(device_id, "status")

    def fetch(self, device_id: str) -> str:
        return self.device(device_id, "fetch")

    def telemetry(self, device_id: str) -> str:
        return self.device(device_id, "telemetry")

    def telemetry_ack(self, device_id: str) -> str:
        return self.device(device_id, "telemetry/ack")

    def examples(self, device_id: str) -> str:
        return self.device(device_id, "examples")

    def examples_ack(self, device_id: str) -> str:
        return self.device(device_id, "examples/ack")

    def keyset(self, device_id: str) -> str:
        """The signed key set's chain for one device (retained; per device, so the broker ACL that confines
        a device to its own subtree needs no rule for it)."""
        return self.device(device_id, "keyset")

    def chunks(self, artifact_id: str) -> str:
        return f"{self.root}/artifacts/{artifact_id}/chunks"

    def device_chunks(self, device_id: str, artifact_id: str = "+") -> str:
        """One device's own chunk topic for ``artifact_id`` (``+``: every artifact, to subscribe)."""
        return self.device(device_id, f"chunks/{artifact_id}")

    @staticmethod
    def chunk_artifact(topic: str) -> str:
        """The artifact id in a shared or per-device chunk topic."""
        levels = topic.split("/")
        return levels[-2] if levels[-1] == "chunks" else levels[-1]

    def all_devices(self, leaf: str) -> str:
        """Hub-side subscription to one leaf of every device."""
        return f"{self.root}/devices/+/{leaf}"

    def parse_device_topic(self, topic: str) -> tuple[str, str] | None:
        """(device id, leaf) of a device topic, or None when the topic is not one."""
        prefix = f"{self.root}/devices/"
        if not topic.startswith(prefix):
            return None
        device_id, _, leaf = topic[len(prefix) :].partition("/")
        return (device_id, leaf) if valid_device_id(device_id) and leaf else None
