"""`cloud-hub serve`: the hub daemon; its flags map one to one to HubConfig."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives import serialization

from cloud_hub.artifacts import ArtifactLocation
from cloud_hub.artifacts_s3 import S3_ENDPOINT_ENV, S3_REGION_ENV, parse_s3_url
from cloud_hub.cli import (
    StateDir,
    app,
    err,
    fail,
    run,
)
from cloud_hub.inference import InferenceOptions
from cloud_hub.server import HubConfig, serve
from cloud_hub.tls_serve import check_serve_flags
from edge_agent.config import parse_endpoint
from edge_agent.errors import ConfigError, EdgefedError
from edge_agent.protocol.signing import check_public_key_file
from edge_agent.protocol.topics import valid_device_id


@app.command("serve")
def serve_command(
    state_dir: StateDir = Path("hub-state"),
    broker: Annotated[
        str | None,
        typer.Option(help="External broker mqtt://host:port or mqtts://host:port (TLS); default: embedded broker"),
    ] = None,
    broker_host: Annotated[str, typer.Option(help="Embedded broker bind address")] = "127.0.0.1",
    broker_port: Annotated[int, typer.Option(help="Embedded broker port")] = 1883,
    grpc_host: Annotated[str, typer.Option(help="Inference (OIP gRPC) bind address")] = "127.0.0.1",
    grpc_port: Annotated[int, typer.Option(help="Inference (OIP gRPC) port; 0 picks a free one")] = 8001,
    admin_host: Annotated[str, typer.Option(help="Admin API bind address")] = "127.0.0.1",
    admin_port: Annotated[int, typer.Option(help="Admin API port; 0 picks a free one")] = 8080,
    trust: Annotated[list[Path] | None, typer.Option(help="Public key (.pub) to trust for uploads; repeatable")] = None,
    topic_root: Annotated[str, typer.Option(help="MQTT topic root")] = "edgefed/v1",
    max_batch_rows: Annotated[int, typer.Option(help="Dynamic batching: most rows per run (1 disables it)")] = 32,
    batch_delay_ms: Annotated[float, typer.Option(help="Dynamic batching: wait this long for more (0: none)")] = 0.0,
    queue_size: Annotated[int, typer.Option(help="Requests queued per model before RESOURCE_EXHAUSTED")] = 256,
    grpc_workers: Annotated[int, typer.Option(help="Inference calls served at once (per process)")] = 64,
    inference_processes: Annotated[
        int,
        typer.Option(
            min=1, help="Processes serving the gRPC port (one Python process uses about one core); try the CPU count"
        ),
    ] = 1,
    intra_op_threads: Annotated[
        int,
        typer.Option(
            min=0, help="ONNX Runtime threads per model session; 0: the CPUs divided among the inference processes"
        ),
    ] = 0,
    max_chunk_rate: Annotated[float, typer.Option(help="Artifact chunks published per second (0: no cap)")] = 0.0,
    shared_above: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Re-asked chunks more than this share of a round's requesting devices lack go on the artifact's "
            "shared topic, the others to each device that asked on its own topic (0: always shared); a first "
            "whole-artifact fetch is always served on the shared topic",
        ),
    ] = 0.5,
    public_broker: Annotated[
        str | None, typer.Option(help="Broker URL enrolled devices use (default: the hub's)")
    ] = None,
    public_grpc: Annotated[
        str | None, typer.Option(help="Inference URL enrolled devices use (default: grpc://host:port)")
    ] = None,
    require_token: Annotated[bool, typer.Option(help="Refuse inference calls without a device token")] = False,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            help="PEM certificate: serve gRPC over TLS (and the admin API with --admin-tls, the embedded broker "
            "with --broker-tls-port); `cloud-hub tls init DIR` writes DIR/server.pem"
        ),
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key for --tls-cert")] = None,
    admin_tls: Annotated[
        bool, typer.Option(help="Serve the admin API over https with --tls-cert/--tls-key (clients: EDGEFED_HUB_CA)")
    ] = False,
    broker_tls_port: Annotated[
        int | None,
        typer.Option(help="The embedded broker also listens with TLS (mqtts://) on this port (--tls-cert/--tls-key)"),
    ] = None,
    broker_tls_only: Annotated[
        bool, typer.Option(help="The embedded broker listens only on --broker-tls-port: plain MQTT is refused")
    ] = False,
    broker_ca: Annotated[
        Path | None,
        typer.Option(help="PEM CA the hub verifies an mqtts:// --broker with (default: the system's CAs)"),
    ] = None,
    broker_cert: Annotated[
        Path | None, typer.Option(help="The hub's client certificate (PEM) for an mqtts:// broker that requires one")
    ] = None,
    broker_key: Annotated[Path | None, typer.Option(help="PEM private key for --broker-cert")] = None,
    serving_profile: Annotated[
        str | None,
        typer.Option(
            help="Profile whose artifacts the inference server runs (default: detected, as edge-agent "
            "detect-profile does)"
        ),
    ] = None,
    deploy_timeout: Annotated[
        float,
        typer.Option(min=1.0, help="Seconds after a deploy when a still pending device shows failed: timed out"),
    ] = 900.0,
    alert_webhook: Annotated[
        str | None,
        typer.Option(
            help="POST each alert event (opened, acknowledged, resolved) as JSON to this http(s) URL; from a "
            "background thread, 5 s deadline, 3 tries; failures are logged and counted in /metrics"
        ),
    ] = None,
    public_metrics: Annotated[
        bool, typer.Option(help="Serve GET /metrics on the admin port without the operator token")
    ] = False,
    drift_window_calls: Annotated[
        int, typer.Option(min=10, help="Samples per drift window of a model version and scope (all, each group)")
    ] = 200,
    drift_interval: Annotated[float, typer.Option(min=0.1, help="Seconds between drift job runs")] = 10.0,
    drift_false_alarms: Annotated[
        float,
        typer.Option(
            "--drift-false-alarms-per-100k",
            min=1e-6,
            help="Drift detector's false-alarm budget per 100,000 clean samples, all features together",
        ),
    ] = 1.0,
    examples_per_device: Annotated[
        int, typer.Option(min=1, help="Hard examples kept per device (opt-in uploads); past it its oldest go")
    ] = 10_000,
    allow_anonymous: Annotated[
        bool,
        typer.Option(
            help="Let MQTT clients without credentials into the embedded broker (lab setups from before "
            "per-device credentials; docs/security.md). Enrolled devices stay confined either way"
        ),
    ] = False,
    artifacts: Annotated[
        str | None,
        typer.Option(
            help="Where artifacts are stored: a directory, or s3://BUCKET/PREFIX on S3-compatible storage "
            "(credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws; a local read-through cache in "
            "STATE/artifact-cache); default: STATE/artifacts"
        ),
    ] = None,
    s3_endpoint: Annotated[
        str | None,
        typer.Option(
            envvar=S3_ENDPOINT_ENV,
            help="Endpoint URL of an S3-compatible server (MinIO, Ceph, ...) for --artifacts s3://...; default: AWS S3",
        ),
    ] = None,
    s3_region: Annotated[
        str | None,
        typer.Option(envvar=S3_REGION_ENV, help="Region of the --artifacts bucket (default: AWS_REGION or ~/.aws)"),
    ] = None,
    registry: Annotated[
        str | None,
        typer.Option(
            help="The registry (artifacts, devices, deployments, telemetry, audit): a postgresql://USER@HOST:PORT/DB "
            "URL (password: PGPASSWORD or ~/.pgpass; its schema is migrated on start) or a SQLite file; default: "
            "STATE/registry.db. The hub's other stores (tokens, rollouts, alerts, drift, signing counters) live in "
            "the same database (docs/operations.md)"
        ),
    ] = None,
    replica: Annotated[
        str | None,
        typer.Option(
            help="Run as replica NAME of several hubs on one broker (--broker: Mosquitto 2, EMQX or HiveMQ; shared "
            "subscriptions) and one --registry postgresql://...: each takes its share of the device messages and "
            "answers the admin API and inference; one at a time, the leader (a lease in the database), drives "
            "rollouts, the drift job and artifact chunk rounds (docs/production.md)"
        ),
    ] = None,
    leader_ttl: Annotated[
        float, typer.Option(min=1.0, help="Seconds a replica's leader lease outlives its last renewal (--replica)")
    ] = 5.0,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Run the hub: registry, MQTT control plane, OIP gRPC inference and the admin API."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s hub %(levelname)s %(name)s: %(message)s")
    if (tls_cert is None) != (tls_key is None):
        err.print("[red]error:[/red] --tls-cert and --tls-key go together")
        raise typer.Exit(2)
    try:  # every flag checked before anything starts: a clear error naming it, never a traceback
        keys = [(key, check_public_key_file(key)) for key in trust or []]
        _check_preflight(broker, tls_cert, tls_key, admin_host, admin_port)
        if artifacts is not None and artifacts.startswith("s3://"):
            parse_s3_url(artifacts)
        if replica is not None and not valid_device_id(replica):
            raise ValueError(f"--replica {replica!r}: a replica's name is letters, digits, '.', '_' and '-'")
        check_serve_flags(broker, tls_cert, tls_key, admin_tls, broker_tls_port, broker_tls_only, broker_ca,
                          broker_cert, broker_key)  # fmt: skip
    except (ValueError, EdgefedError) as exc:
        raise fail(exc) from None
    (state_dir / "trust").mkdir(parents=True, exist_ok=True)
    for key, public in keys:  # as NAME.pub, the public key only
        pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        (state_dir / "trust" / f"{key.stem}.pub").write_bytes(pem)
    inference = InferenceOptions(max_batch_rows=max_batch_rows, batch_delay_ms=batch_delay_ms, queue_size=queue_size,
                                 workers=grpc_workers, processes=inference_processes,
                                 intra_op_threads=intra_op_threads,
                                 require_token=require_token, tls_cert=tls_cert, tls_key=tls_key)  # fmt: skip
    config = HubConfig(
        state_dir,
        broker,
        broker_host,
        broker_port,
        grpc_host,
        grpc_port,
        admin_host,
        admin_port,
        topic_root,
        inference,
        max_chunk_rate,
        public_broker,
        public_grpc,
        shared_above,
        serving_profile,
        deploy_timeout,
        alert_webhook=alert_webhook,
        public_metrics=public_metrics,
        drift_window_calls=drift_window_calls,
        drift_interval_s=drift_interval,
        drift_false_alarms_per_100k=drift_false_alarms,
        examples_per_device=examples_per_device,
        allow_anonymous=allow_anonymous,
        admin_tls=admin_tls,
        broker_tls_port=broker_tls_port,
        broker_tls_only=broker_tls_only,
        broker_ca=broker_ca,
        broker_cert=broker_cert,
        broker_key=broker_key,
        artifacts=ArtifactLocation(artifacts, s3_endpoint, s3_region),
        registry=registry,
        replica=replica,
        leader_ttl_s=leader_ttl,
    )
    try:
        run(lambda: serve(config))
    except (OSError, ValueError, EdgefedError) as exc:  # a port taken meanwhile, a bad key in STATE/trust
        raise fail(exc) from None


def _check_preflight(broker: str | None, tls_cert: Path | None, tls_key: Path | None, admin_host: str,
                     admin_port: int) -> None:  # fmt: skip
    """ConfigError naming the flag: a bad --broker URL, a missing or non-PEM TLS file, a taken --admin-port."""
    if broker is not None:
        parse_endpoint(broker, "mqtts" if broker.startswith("mqtts://") else "mqtt", "--broker", 1883)
    for flag, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if path is None:
            continue
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{flag} {path}: {exc.strerror or exc}; give a PEM file (cloud-hub tls init)") from None
        if b"-----BEGIN " not in data:
            raise ConfigError(f"{flag} {path}: not a PEM file; give a PEM certificate and its key")
    if admin_port:
        probe = socket.socket(socket.AF_INET6 if ":" in admin_host else socket.AF_INET)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the admin server binds
            probe.bind((admin_host, admin_port))
        except OSError as exc:
            raise ConfigError(f"--admin-port {admin_port}: cannot listen on {admin_host}:{admin_port} "
                              f"({exc.strerror or exc}); choose another with --admin-port PORT (0 picks a free one)"
                              ) from None  # fmt: skip
        finally:
            probe.close()
