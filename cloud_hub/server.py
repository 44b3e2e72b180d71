"""`cloud-hub serve`: the registry, the MQTT control plane, the OIP inference server and the admin API
in one process that owns the hub's state directory.

    STATE/registry.db        SQLite registry and the hub's other stores (WAL); with --registry postgresql://...
                             all of them are in that database instead (docs/operations.md, "The registry")
    STATE/artifacts/{id}/    content-addressed artifacts (or --artifacts DIR | s3://bucket/prefix: artifacts_s3.py)
    STATE/trust/*.pub        artifact keys added with --trust; they join the signed key set on start
    STATE/keyset/            the signed key set: trusted and revoked artifact keys, the hub key (cloud_hub/keys.py)
    STATE/operator.token     the admin API token (mode 0600), created on first start
    STATE/hub-key/           the hub's desired-state signing key (hub.key 0600, hub.pub), made on first start
    STATE/examples/          opt-in hard examples devices uploaded (cloud_hub/examples.py)
    STATE/mqtt/              MQTT users: passwd (hashes), hub.password (0600) (cloud_hub/mqtt_auth.py)
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from cloud_hub.ab import AbTests
from cloud_hub.accounting import UsageCounter
from cloud_hub.admin import AdminApi
from cloud_hub.alerts import AlertStore, AlertWebhook
from cloud_hub.auth import ACTOR
from cloud_hub.broker import EmbeddedBroker
from cloud_hub.control import ControlPlane
from cloud_hub.desired_signing import DesiredSigner
from cloud_hub.drift.monitor import DriftMonitor
from cloud_hub.enroll_grants import ReenrollGrants
from cloud_hub.enrollment import DeviceEnrollment
from cloud_hub.errors import Conflict, NotFound
from cloud_hub.examples import EXAMPLES_DIR, ExampleIngest, ExampleStore
from cloud_hub.fetch_limits import FetchLimiter
from cloud_hub.hub_config import TOKEN_FILE as TOKEN_FILE  # re-exported: callers import them from here
from cloud_hub.hub_config import HubConfig as HubConfig
from cloud_hub.hub_config import operator_token as operator_token
from cloud_hub.hub_config import serving_profile as serving_profile
from cloud_hub.inference import (
    InferenceServer,
    ModelRepository,
    TokenOwners,
    start_inference_server,
)
from cloud_hub.keys import HubKeys
from cloud_hub.leader import LeaderLease
from cloud_hub.mqtt_auth import MqttUsers
from cloud_hub.registration import check_registration, registered_interface
from cloud_hub.rollouts import RolloutEngine
from cloud_hub.tls_serve import admin_context, hub_mqtt_context
from cloud_hub.workers import USAGE_FLUSH_S, InferenceWorkers, WorkerSpec, free_port, open_store
from edge_agent import __version__
from edge_agent.errors import ConfigError
from edge_agent.protocol.topics import Topics, shared

log = logging.getLogger(__name__)


class Hub(DeviceEnrollment):
    def __init__(self, config: HubConfig) -> None:
        self.config = config
        state = config.state_dir
        (state / "trust").mkdir(parents=True, exist_ok=True)
        self.registry, self.store = open_store(state, config.artifacts, config.registry)
        db = self.registry.sql_db()  # the other stores' tables: the registry's database (SQLite or PostgreSQL)
        self.topics = Topics(config.topic_root)
        # MQTT users (docs/security.md): the hub's own, made on first start, and one per enrolled device;
        # the embedded broker authenticates against them and confines each device to its own topics
        self.mqtt_users = MqttUsers(state)
        self.mqtt_credentials = self.mqtt_users.hub_credentials(config.replica)  # a replica: a user of its own
        self.broker = None if config.broker else EmbeddedBroker(
            config.broker_host, config.broker_port, password_file=self.mqtt_users.passwd,
            allow_anonymous=config.allow_anonymous, topic_root=config.topic_root,
            tls_port=config.broker_tls_port, certfile=config.inference.tls_cert, keyfile=config.inference.tls_key,
            tls_only=config.broker_tls_only)  # fmt: skip
        self.broker_url = config.broker or (self.broker.url if self.broker else "")
        self.serving_profile = serving_profile(config.serving_profile)
        self.repository = ModelRepository(self.registry, self.store, self.serving_profile, config.inference)
        self.usage = UsageCounter()
        self.token_owner = TokenOwners(self.registry)
        self.workers: InferenceWorkers | None = None
        self.control: ControlPlane | None = None
        self.admin: AdminApi | None = None
        self.leader: LeaderLease | None = None  # with --replica (start())
        self.grpc_server: InferenceServer | None = None
        self.grpc_port = 0
        self.stopped = threading.Event()
        self._registering = threading.Lock()  # one upload's checks and registration at a time
        self.alerts = AlertStore(db)  # the drift job raises alerts here
        self.webhook = AlertWebhook(config.alert_webhook) if config.alert_webhook else None
        if self.webhook is not None:
            self.alerts.subscribe(self.webhook)
        self.examples = ExampleStore(state / EXAMPLES_DIR, config.examples_per_device)
        self.keys = HubKeys(state, self.registry, self.store)  # the signed key set; first: it ends a rotation
        self.desired_signer = DesiredSigner(state, db)  # hub key, counters (security.md)
        self.keys.signer = self.desired_signer
        self.reenroll = ReenrollGrants(db)  # tokens that may re-enroll an id
        self._enrolling = threading.Lock()  # an enrollment's checks, token use and registration at once
        self.rollouts = RolloutEngine(self, db, tick_s=config.rollout_tick_s)
        self.ab = AbTests(self, db)  # A/B tests (docs/ab.md)
        self.drift = DriftMonitor(self.registry, self.store, self.alerts, db,
                                  window_calls=config.drift_window_calls, interval_s=config.drift_interval_s,
                                  false_alarms_per_100k=config.drift_false_alarms_per_100k)  # fmt: skip

    def start(self) -> None:
        self.leader = self._leader_lease()
        if self.broker is not None:
            self.broker.start()
        self.control = ControlPlane(self.broker_url, self.registry, self.store, self.topics, self.config.max_chunk_rate,
                                    shared_above=self.config.shared_above, signer=self.desired_signer,
                                    credentials=self.mqtt_credentials, tls_context=hub_mqtt_context(
                                        self.broker_url, self.config.broker_ca, self.config.broker_cert,
                                        self.config.broker_key, self.config.inference.tls_cert if self.broker else None,
                                    ), replica=self.config.replica)  # fmt: skip
        self.control.leading = self.leading
        self.control.fetch_limiter = FetchLimiter(self.config.fetch_requests_per_s, self.config.fetch_budget_s)
        self.control.ab_for = self.ab.desired_ab  # desired states name the B side of running A/B tests
        examples = self.topics.all_devices("examples")  # devices/+/examples → stored, acknowledged
        ExampleIngest(self.examples, self.control.mqtt, self.topics, shared(examples) if self.config.replica else None)
        self.control.start()
        self.keys.start(self.control)  # the key set, retained on devices/{id}/keyset
        if self.config.inference.processes == 1:
            self.grpc_server = start_inference_server(
                self.repository, self.config.grpc_host, self.config.grpc_port, __version__, self.usage, self.token_owner
            )
            self.grpc_port = self.grpc_server.port
            threading.Thread(target=self.repository.warm, name="edgefed-warm", daemon=True).start()
        else:  # inference in worker processes only: the control plane keeps this process's GIL to itself
            self.grpc_port = self.config.grpc_port or free_port(self.config.grpc_host)
            spec = WorkerSpec(self.config.state_dir, self.serving_profile.id, __version__,
                              f"{self.config.grpc_host}:{self.grpc_port}", self.config.inference,
                              logging.getLogger().level, self.config.artifacts, self.config.registry)  # fmt: skip
            self.workers = InferenceWorkers(spec, self.config.inference.processes, self.repository.generation)
        threading.Thread(target=self._flush_usage_periodically, name="edgefed-usage", daemon=True).start()
        if self.webhook is not None:
            self.webhook.start()
        self.drift.only_while(self.leading)
        self.rollouts.only_while(self.leading)
        if self.leader is not None:
            self.leader.start()
        self.drift.start()
        self.rollouts.start()
        admin_tls = admin_context(self.config.admin_tls, self.config.inference.tls_cert, self.config.inference.tls_key)
        self.admin = AdminApi(self, operator_token(self.config.state_dir), self.config.admin_host,
                              self.config.admin_port, public_metrics=self.config.public_metrics,
                              ssl_context=admin_tls)  # fmt: skip
        self.admin.start()
        log.info(
            "hub up: broker %s, gRPC %s:%d, admin %s://%s:%d",
            self.broker_url,
            self.config.grpc_host,
            self.grpc_port,
            self.admin.scheme,
            self.config.admin_host,
            self.admin.port,
        )

    def _leader_lease(self) -> LeaderLease | None:
        """With --replica, the lease that decides which replica leads; ConfigError for a setup replicas
        cannot share (the embedded broker has no shared subscriptions; SQLite is one machine's file)."""
        if self.config.replica is None:
            return None
        if self.broker is not None:
            raise ConfigError("--replica needs an external broker with shared subscriptions (Mosquitto 2, EMQX, "
                              "HiveMQ): pass --broker mqtt://HOST:PORT; the embedded one serves one hub")  # fmt: skip
        if not (self.config.registry or "").startswith(("postgresql://", "postgres://")):
            raise ConfigError("--replica needs a registry every replica shares: pass --registry "
                              "postgresql://USER@HOST/DB (SQLite is one machine's file)")  # fmt: skip
        return LeaderLease(self.registry, self.config.replica, self.config.leader_ttl_s, self._leadership_changed)

    def _leadership_changed(self, leading: bool) -> None:
        if leading:  # the drift job goes on from what the previous leader saved, not from this hub's memory
            self.drift.reload()

    def leading(self) -> bool:
        """Whether this hub drives rollouts, the drift job and chunk rounds: always when it runs alone."""
        return self.leader is None or self.leader.leading()

    def stop(self) -> None:
        if self.admin is not None:
            self.admin.stop()
        if self.workers is not None:
            self.workers.stop()
        if self.grpc_server is not None:
            self.grpc_server.stop(grace_s=2)
        self.stopped.set()
        self.flush_usage()
        self.rollouts.stop()
        self.drift.stop()
        self.alerts.close()
        if self.webhook is not None:
            self.webhook.stop()
        if self.control is not None:
            self.control.stop()
        if self.leader is not None:  # given up once this hub's rollouts, drift job and chunk rounds stopped
            self.leader.stop()
        self.examples.close()
        self.desired_signer.close()
        self.reenroll.close()
        self.ab.close()
        if self.broker is not None:
            self.broker.stop()

    def status(self) -> dict[str, Any]:
        control = self.control
        return {
            "version": __version__,
            "broker": self.broker_url,
            "embedded_broker": self.broker is not None,
            "grpc": f"grpc://{self.config.grpc_host}:{self.grpc_port}",
            "serving_profile": self.serving_profile.id,
            "topic_root": self.config.topic_root,
            "replica": self.config.replica,
            "leader": self.leading(),
            "devices": len(self.registry.devices()),
            "artifacts": len(self.registry.artifacts()),
            "chunks_sent": control.chunks_sent if control else 0,
            "telemetry_stored": control.telemetry_stored if control else 0,
            "corrupt_chunks": control.corrupt_chunks if control else 0,
            "malformed_messages": control.mqtt.malformed if control else 0,
            "hard_examples": dict(self.examples.counters),
        }

    def drift_scores(self) -> list[tuple[str, str, str, str, float]]:
        """The drift score per (model, version, scope, feature), for ``/metrics``: the feature's largest
        CUSUM over the alarm threshold (1 or more: alarming)."""
        return self.drift.scores()

    def drift_report(self, model: str, version: str | None, scope: str, since: float) -> dict[str, Any]:
        if not self.registry.artifacts(model):
            raise NotFound(f"model {model!r} is unknown; see 'cloud-hub models list'")
        return self.drift.report(model, version, scope, since)

    def add_artifact(self, tar_path: Path, allow_interface_change: bool = False) -> dict[str, Any]:
        """Verify, check against the version's other artifacts (registration.py) and register."""
        with self._registering:
            manifest = self.store.add_tar(tar_path, self.config.max_upload_bytes)
            try:
                check_registration(self.registry, manifest, allow_interface_change)
            except Conflict:
                self.store.discard(manifest.artifact_id)  # (one already registered is never refused)
                raise
            new = self.registry.add_artifact(manifest, self.store.signature(manifest.artifact_id))
        self.repository.invalidate()
        if self.grpc_server is not None:  # (workers load it themselves)
            threading.Thread(target=self.repository.warm, args=([manifest.name],), daemon=True).start()
        self.registry.audit(ACTOR.get(), "models.add", {"artifact_id": manifest.artifact_id, "new": new,
                                                       "allow_interface_change": allow_interface_change})  # fmt: skip
        return {
            "artifact_id": manifest.artifact_id,
            "name": manifest.name,
            "version": manifest.version,
            "release": manifest.release,
            "profile": manifest.hardware.profile,
            "precision": manifest.precision,
            "new": new,
        }

    def model_version(self, name: str, version: str) -> dict[str, Any]:
        """One model version: its release, interface, and per profile the artifact, whether this hub's
        inference server can serve it, and the compiler's validation and latency."""
        rows = [r for r in self.registry.artifacts(name) if r["version"] == version]
        if not rows:
            raise NotFound(f"{name}@{version} is not registered; see 'cloud-hub models show {name}'")
        manifests = [self.registry.artifact(r["artifact_id"])["manifest"] for r in rows]
        artifacts = [
            {**row, "runtime": m["runtime"], "servable": self.repository.servable(m),
             "validation": {k: v for k, v in m.get("validation", {}).items() if k != "attempts"},
             "latency_ms": m.get("latency_ms", {})}
            for row, m in zip(rows, manifests, strict=True)
        ]  # fmt: skip
        interface = registered_interface(manifests[0]).to_wire()
        return {"name": name, "version": version, "release": rows[0]["release"], "interface": interface,
                "serving_profile": self.serving_profile.id, "artifacts": artifacts}  # fmt: skip

    def flush_usage(self) -> None:
        self.usage.flush_to(self.registry)

    def _flush_usage_periodically(self) -> None:
        while not self.stopped.wait(USAGE_FLUSH_S):
            self.flush_usage()

    def deployment(self, deployment_id: str) -> dict[str, Any]:
        """A deployment with each targeted device's state: active, failed (with the error), pending, or
        failed as timed out when still pending ``deploy_timeout_s`` after the deploy."""
        found = [d for d in self.registry.deployments() if d["deployment_id"] == deployment_id]
        if not found:
            raise NotFound(f"deployment {deployment_id!r} is unknown; see 'cloud-hub deployments list'")
        deployment = found[0]
        expired = time.time() - deployment["created"] > self.config.deploy_timeout_s
        states = {}
        for device_id in deployment["devices"]:
            states[device_id] = self._device_state(device_id, deployment)
            if states[device_id]["state"] == "pending" and expired:
                states[device_id] = {"state": "failed", "error": f"timed out: {deployment['name']}@"
                                     f"{deployment['version']} not reported active within "
                                     f"{self.config.deploy_timeout_s:g} s of the deploy"}  # fmt: skip
        return {**deployment, "states": states, "rollback": self.desired_signer.rollback_deployment(deployment_id)}

    def _device_state(self, device_id: str, deployment: dict[str, Any]) -> dict[str, Any]:
        try:
            reported = self.registry.device(device_id)["reported"] or {}
        except NotFound:
            return {"state": "removed"}
        model = next((m for m in reported.get("models", []) if m["name"] == deployment["name"]), None)
        if model is not None and model.get("origin") == "local" and model.get("version") != deployment["version"]:
            return {"state": "overridden", "error": f"{model.get('version')} made active on the device (a local "
                    "rollback or activate); stands until the hub's next desired state"}  # fmt: skip
        if model is None or model.get("version") != deployment["version"]:
            # a device that refused this desired state (or whose report the hub refused) says why: an error
            # reported since the deploy, other than a report cut to size (its models are not all there)
            error = reported.get("error") or ""
            fresh = reported.get("received_at", 0.0) >= deployment["created"] and not error.startswith("report cut")
            return {"state": "failed", "error": error} if error and fresh else {"state": "pending"}
        return {"state": model["state"], "error": model.get("error")}

    def deploy(self, name: str, version: str, target: str) -> dict[str, Any]:
        assert self.control is not None
        result = self.control.deploy(name, version, target)
        self.registry.audit(ACTOR.get(), "deploy", {"model": name, "version": version, "target": target, **result})
        return result

    def rollback(self, name: str, version: str, target: str) -> dict[str, Any]:
        """A signed rollback of ``target`` (device:ID, group:G, tag:K=V) to ``name@version``: a deployment whose
        signed desired states let devices go below their installed release (docs/security.md)."""
        assert self.control is not None
        result = self.control.rollback(name, version, target)
        self.registry.audit(ACTOR.get(), "rollback", {"model": name, "version": version, "target": target, **result})
        return result

    def rollback_devices(self, name: str, version: str, device_ids: list[str], label: str) -> dict[str, Any]:
        """A rollout's automatic rollback: these devices to ``name@version``, as one signed rollback."""
        assert self.control is not None
        devices = [self.registry.device(d) for d in device_ids]
        result = self.control.rollback_devices(name, version, devices, label)
        self.registry.audit("rollouts", "rollback", {"model": name, "version": version, "target": label, **result})
        return result

    def deploy_devices(self, name: str, version: str, device_ids: list[str], label: str) -> dict[str, Any]:
        """A rollout wave: deploy to these devices, recorded as a deployment with target ``label``."""
        assert self.control is not None
        result = self.control.deploy_devices(name, version, [self.registry.device(d) for d in device_ids], label)
        self.registry.audit("rollouts", "deploy", {"model": name, "version": version, "target": label, **result})
        return result


def serve(config: HubConfig) -> None:
    """Run until SIGTERM or SIGINT, then shut down cleanly."""
    hub = Hub(config)
    hub.start()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(
        f"edgefed hub ready: broker {hub.broker_url} grpc://{config.grpc_host}:{hub.grpc_port} "
        f"admin {hub.admin.scheme if hub.admin else 'http'}://{config.admin_host}:{hub.admin.port if hub.admin else 0}",
        flush=True,
    )
    done.wait()
    hub.stop()
