"""`edge-agent enroll`: trade a single-use enrollment token for this device's configuration."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig
from edge_agent.desired_guard import install_hub_key
from edge_agent.errors import ConfigError
from edge_agent.protocol.atomic import atomic_write_bytes
from edge_agent.protocol.signing import TrustStore


def request_enrollment(hub: str, token: str, device_id: str, profile: str, timeout_s: float = 30.0) -> dict[str, Any]:
    body = json.dumps({"token": token, "device_id": device_id, "profile": profile}).encode()
    req = urllib.request.Request(f"{hub.rstrip('/')}/v1/enroll", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        raise ConfigError(f"the hub refused enrollment ({exc.code}): {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ConfigError(f"cannot reach the hub at {hub}: {exc}") from None


def enroll(hub: str, token: str, device_id: str, profile: str, state_dir: Path) -> AgentConfig:
    """Enroll, then write the trusted keys, the hub's desired-state key (``hub-keys/hub.pub``, when the hub
    sends one) and ``agent.json`` (0640) into ``state_dir``."""
    answer = request_enrollment(hub, token, device_id, profile)
    config = AgentConfig(device_id=answer["device_id"], profile=answer["profile"], broker=answer["broker"],
                         cloud=answer.get("cloud"), cloud_token=answer.get("cloud_token"),
                         topic_root=answer.get("topic_root", AgentConfig.topic_root))  # fmt: skip
    trust = state_dir / "trust"
    trust.mkdir(parents=True, exist_ok=True)
    for index, pem in enumerate(answer.get("trusted_keys", [])):
        atomic_write_bytes(trust / f"hub-{index}.pub", pem.encode())
    if not TrustStore.from_dir(trust).keys:
        raise ConfigError("the hub sent no signing keys to trust; give the hub one with 'cloud-hub serve --trust'")
    if answer.get("hub_key"):  # a hub older than signed desired states sends none: unsigned ones are followed
        try:
            install_hub_key(state_dir, str(answer["hub_key"]).encode())
        except ValueError as exc:
            raise ConfigError(f"the hub's answer: hub_key: {exc}") from None
    config.save(state_dir)
    return config
