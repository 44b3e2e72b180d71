"""What `cloud-hub serve` is asked to run (``HubConfig``, its flags one to one), the profile its inference
server serves and the operator token in its state directory; ``server.py`` runs it."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cloud_hub.artifacts import ArtifactLocation
from cloud_hub.examples import MAX_PER_DEVICE
from cloud_hub.inference import InferenceOptions
from cloud_hub.leader import DEFAULT_TTL_S
from device_profiles import DeviceProfile, ProfileError, get_profile, load_profiles
from device_profiles.detect import detect_profile
from edge_agent.protocol.atomic import atomic_write_bytes
from edge_agent.protocol.topics import DEFAULT_ROOT

TOKEN_FILE = "operator.token"


@dataclass(frozen=True)
class HubConfig:
    """Flags of `cloud-hub serve`, one to one."""

    state_dir: Path
    broker: str | None = None  # None: start the embedded broker
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 8001
    admin_host: str = "127.0.0.1"
    admin_port: int = 8080
    topic_root: str = DEFAULT_ROOT
    inference: InferenceOptions = field(default_factory=InferenceOptions)
    max_chunk_rate: float = 0.0  # artifact chunks per second the hub publishes; 0 = as fast as the broker takes them
    public_broker: str | None = None  # the broker URL devices use (enrollment); default: the hub's own
    public_grpc: str | None = None  # the inference URL devices use; default: grpc://grpc_host:port
    shared_above: float = 0.5  # chunks more of a round's devices lack than this share: shared topic
    serving_profile: str | None = None  # the profile whose artifacts the OIP server runs; None: detected
    deploy_timeout_s: float = 900.0  # a device still pending this long after a deploy shows "failed: timed out"
    alert_webhook: str | None = None  # POST alert events (opened, acknowledged, resolved) here as JSON
    public_metrics: bool = False  # serve GET /metrics without the operator token
    drift_window_calls: int = 200  # samples per drift window of a model version and scope
    drift_interval_s: float = 10.0  # how often the drift job reads new telemetry
    examples_per_device: int = MAX_PER_DEVICE  # hard examples kept per device (its oldest go first)
    drift_false_alarms_per_100k: float = 1.0  # the detector's false-alarm budget per 100,000 clean samples
    rollout_tick_s: float = 1.0  # how often the rollout engine takes each running rollout a step
    allow_anonymous: bool = False  # the embedded broker also lets clients without credentials in (docs/security.md)
    max_upload_bytes: int = 4 * 1024**3  # an uploaded artifact tar, and the sum of its members' sizes
    fetch_requests_per_s: float = 20.0  # fetch requests a device may make per second (0: no limits)
    fetch_budget_s: float = 10.0  # a device gets one full artifact per this many seconds (burst: two)
    # TLS (docs/security.md, "TLS"); the certificate pair is inference.tls_cert/tls_key (--tls-cert/--tls-key)
    admin_tls: bool = False  # serve the admin API over https with that pair
    broker_tls_port: int | None = None  # the embedded broker also listens with TLS (that pair) on this port
    broker_tls_only: bool = False  # ... and only there: no plain listener
    broker_ca: Path | None = None  # CA the hub verifies an mqtts:// broker with (default: system CAs; its own pinned)
    broker_cert: Path | None = None  # the hub's client certificate for an mqtts:// broker that requires one
    broker_key: Path | None = None
    artifacts: ArtifactLocation = field(default_factory=ArtifactLocation)  # --artifacts, --s3-endpoint, --s3-region
    registry: str | None = None  # --registry postgresql://...: the Registry there; None: SQLite STATE/registry.db
    replica: str | None = None  # --replica NAME: one of several hubs on one broker and database (leader.py)
    leader_ttl_s: float = DEFAULT_TTL_S  # how long a killed leader's lease outlives it


def serving_profile(profile_id: str | None) -> DeviceProfile:
    """The profile the hub's inference server runs artifacts for: ``profile_id``, else this machine's."""
    if profile_id:
        return get_profile(profile_id)
    found = detect_profile(load_profiles())
    if found is None:
        raise ProfileError("<host>", "serving_profile", "no profile matches this machine", "pass --serving-profile ID")
    return found.profile


def operator_token(state_dir: Path) -> str:
    """The admin token, created (0600) on first use."""
    path = state_dir / TOKEN_FILE
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, secrets.token_urlsafe(32).encode(), mode=0o600)
    return path.read_text().strip()
