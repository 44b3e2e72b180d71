"""The device's state directory and the agent configuration stored in it.

STATE/agent.json              AgentConfig (mode 0640: it holds credentials; 0600 with an MQTT password)
STATE/keyset.json            the signed key set: trusted and revoked artifact keys, the hub keys (trust.py)
STATE/trust/*.pub             artifact keys added on the device (init --trust), less the key set's revoked ones
STATE/hub-keys/*.pub          the hub's desired-state key, used while no key set is held (desired_guard.py)
STATE/models/                 the model store (see store.py)
STATE/downloads/{artifact}/   chunks of transfers in progress
STATE/telemetry.db            the telemetry spool (SQLite, WAL)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from urllib.parse import urlparse

from edge_agent.errors import ConfigError
from edge_agent.protocol.atomic import atomic_write_bytes
from edge_agent.protocol.topics import DEFAULT_ROOT, valid_device_id
from edge_agent.spool_schema import DEFAULT_MAX_CALLS, DROP_OLDEST, FULL_POLICIES

STATE_DIR_ENV = "EDGEFED_STATE_DIR"
CONFIG_FILE = "agent.json"


def default_state_dir() -> Path:
    """EDGEFED_STATE_DIR, else /var/lib/edgefed when it exists, else ~/.local/share/edgefed."""
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV])
    system = Path("/var/lib/edgefed")
    return system if system.is_dir() else Path.home() / ".local" / "share" / "edgefed"


def parse_endpoint(url: str, scheme: str, field_name: str, default_port: int) -> tuple[str, int]:
    """(host, port) of ``scheme://host:port``; a clear ConfigError otherwise."""
    parsed = urlparse(url if "://" in url else f"{scheme}://{url}")
    if parsed.scheme != scheme or not parsed.hostname:
        raise ConfigError(f"{field_name}: {url!r} is not a {scheme}:// URL; write it as {scheme}://host:port")
    try:
        return parsed.hostname, parsed.port or default_port
    except ValueError:
        raise ConfigError(f"{field_name}: bad port in {url!r}") from None


def parse_broker(url: str, field_name: str = "broker") -> tuple[str, int, bool]:
    """(host, port, tls) of ``mqtt://host:port`` (port 1883) or ``mqtts://host:port`` (TLS, port 8883)."""
    if url.startswith("mqtts://"):
        host, port = parse_endpoint("mqtt://" + url[len("mqtts://") :], "mqtt", field_name, 8883)
        return host, port, True
    try:
        host, port = parse_endpoint(url, "mqtt", field_name, 1883)
    except ConfigError:
        raise ConfigError(f"{field_name}: {url!r} is not an mqtt:// or mqtts:// URL; write it as mqtt://host:port "
                          "or mqtts://host:port (TLS)") from None  # fmt: skip
    return host, port, False


@dataclass(frozen=True)
class AgentConfig:
    """What the agent and the SDK need to know; validated on construction."""

    device_id: str
    profile: str
    broker: str = "mqtt://127.0.0.1:1883"
    cloud: str | None = None
    cloud_token: str | None = None  # bearer token for the cloud route (per device)
    cloud_ca: str | None = None  # CA bundle for grpcs:// endpoints
    topic_root: str = DEFAULT_ROOT
    telemetry_interval_s: float = 5.0
    spool_max_calls: int = DEFAULT_MAX_CALLS  # the telemetry spool's cap (calls waiting to be sent)
    spool_full: str = DROP_OLDEST  # past the cap: drop_oldest or reject_new (both counted as dropped)
    mqtt_username: str | None = None  # the broker user (= device_id when the hub issued it at enrollment)
    mqtt_password: str | None = field(default=None, repr=False)  # its password (agent.json 0600 then); None: anonymous
    broker_ca: str | None = None  # CA (PEM) of an mqtts:// broker's certificate; None: the system's CAs
    broker_cert: str | None = None  # client certificate (PEM) for a broker that requires one (mTLS)
    broker_key: str | None = None  # its private key (PEM)

    def __post_init__(self) -> None:
        if not valid_device_id(self.device_id):
            raise ConfigError(f"device_id: {self.device_id!r} is invalid; use letters, digits, '.', '_' and '-'")
        _, _, tls = parse_broker(self.broker)
        if not tls and (self.broker_ca or self.broker_cert or self.broker_key):
            raise ConfigError(f"broker_ca, broker_cert and broker_key are for TLS, but broker is {self.broker}; "
                              "write it as mqtts://host:port")  # fmt: skip
        if (self.broker_cert is None) != (self.broker_key is None):
            raise ConfigError("broker_cert and broker_key: give both (a client certificate and its key) or neither")
        if self.cloud is not None:
            parse_endpoint(self.cloud.replace("grpcs://", "grpc://", 1), "grpc", "cloud", 8001)
        if self.telemetry_interval_s <= 0:
            raise ConfigError("telemetry_interval_s: must be positive")
        if type(self.spool_max_calls) is not int or self.spool_max_calls < 1:
            raise ConfigError(f"spool_max_calls: {self.spool_max_calls!r} is not a positive whole number of calls")
        if (self.mqtt_username is None) != (self.mqtt_password is None):
            raise ConfigError("mqtt_username and mqtt_password: give both (enrollment writes them) or neither")
        if self.spool_full not in FULL_POLICIES:
            raise ConfigError(f"spool_full: {self.spool_full!r} is not one of {', '.join(FULL_POLICIES)}")

    @classmethod
    def load(cls, state_dir: Path) -> AgentConfig:
        path = state_dir / CONFIG_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} not found; run 'edge-agent init' (or 'edge-agent enroll') first") from None
        except ValueError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"{path}: unknown field {sorted(unknown)[0]!r}; remove it")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def save(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        mode = 0o600 if self.mqtt_password else 0o640  # a broker password: readable by the agent's user only
        atomic_write_bytes(state_dir / CONFIG_FILE, json.dumps(asdict(self), indent=2).encode(), mode=mode)
