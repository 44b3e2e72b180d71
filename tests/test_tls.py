"""TLS for MQTT, gRPC and the admin API (issue 14), with certificates from `cloud-hub tls init`, on real
servers on free ports: agent ↔ broker over TLS on Mosquitto (the `cloud-hub broker-config --tls-listen`
configuration, mTLS) and on the embedded broker, SDK ↔ gRPC, CLI ↔ admin API. Plain connections to a
TLS-only listener are refused, and so is a certificate from another CA, with a clear error and in
seconds. Each refusal is paired with the same call succeeding with the right certificate."""

from __future__ import annotations

import json
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import free_port, make_artifact, wait_for
from cryptography import x509
from typer.testing import CliRunner

from cloud_hub.api_client import HUB_CA_ENV, AdminClient
from cloud_hub.cli import app as hub_cli
from cloud_hub.errors import HubError
from cloud_hub.inference import InferenceOptions
from cloud_hub.server import Hub, HubConfig, operator_token
from cloud_hub.tls_init import TlsFiles, tls_init
from edge_agent.agent import Agent
from edge_agent.cli import app as agent_cli
from edge_agent.client import EdgeClient
from edge_agent.cloud import CloudClient
from edge_agent.config import AgentConfig
from edge_agent.enroll import enroll
from edge_agent.errors import CloudUnavailable, ConfigError
from edge_agent.mqtt import MqttConnection
from edge_agent.tls import AgentTls

PROFILE = "x86-64-generic"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
X = np.ones((2, 32), np.float32)


@dataclass
class Pki:
    good: TlsFiles  # the hub's CA: server certificate and client certificates for dev-1 and the hub
    rogue: TlsFiles  # another CA, with a server certificate and a dev-1 certificate of its own


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    return Pki(tls_init(root / "good", ["hub.test"], ["dev-1", "edgefed-hub"]), tls_init(root / "rogue", [], ["dev-1"]))


def _hub_state(tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    state = tmp_path / "hub"
    (state / "trust").mkdir(parents=True)
    shutil.copy(keys[1], state / "trust")
    return state


@pytest.fixture
def tls_hub(tmp_path: Path, keys: tuple[Path, Path], pki: Pki) -> Iterator[Hub]:
    """A hub whose gRPC, admin API and embedded broker all serve the one certificate pair, the broker
    TLS-only."""
    options = InferenceOptions(tls_cert=pki.good.server_cert, tls_key=pki.good.server_key)
    config = HubConfig(_hub_state(tmp_path, keys), broker_port=free_port(), broker_tls_port=free_port(),
                       broker_tls_only=True, admin_tls=True, grpc_port=0, admin_port=0, inference=options)  # fmt: skip
    hub = Hub(config)
    hub.start()
    yield hub
    hub.stop()


def admin_url(hub: Hub) -> str:
    assert hub.admin is not None
    return f"{hub.admin.scheme}://127.0.0.1:{hub.admin.port}"


def enroll_device(hub: Hub, pki: Pki, state: Path, broker_tls: AgentTls) -> AgentConfig:
    """`edge-agent enroll` over the admin API (https:// verified with the CA when the hub serves it)."""
    url = admin_url(hub)
    ca = pki.good.ca_cert if url.startswith("https://") else None
    client = AdminClient(url, operator_token(hub.config.state_dir), ca=ca)
    body = json.dumps({"groups": [], "tags": {}, "ttl_s": 60}).encode()
    token = str(client.request("POST", "/v1/enroll-tokens", body)["token"])
    return enroll(url, token, "dev-1", PROFILE, state, ca, broker_tls=broker_tls)


def run_agent_until_online(hub: Hub, state: Path) -> None:
    """The real agent daemon, until the hub has its online status (it came over the TLS broker)."""
    agent = Agent(state, AgentConfig.load(state))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        wait_for("dev-1 online at the hub", lambda: hub.registry.device("dev-1")["status"] == "online", 30)
    finally:
        agent.stop_event.set()
        thread.join(timeout=10)


def connect(url: str, password: str, **tls: Any) -> float:
    """Connect as dev-1 and disconnect; the seconds it took. ConfigError when refused."""
    started = time.monotonic()
    connection = MqttConnection(url, client_id="edgefed-dev-1", username="dev-1", password=password, **tls)
    connection.start(timeout_s=4)
    connection.stop()
    return time.monotonic() - started


def refused(url: str, password: str, **tls: Any) -> str:
    """The error of a connection that must be refused, within seconds (never a hang)."""
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        connect(url, password, **tls)
    assert time.monotonic() - started < 10, "a refused TLS connection must fail fast"
    return str(caught.value)


# --- cloud-hub tls init -------------------------------------------------------------------------------


def test_tls_init_writes_a_ca_server_and_device_certificates(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "pki"
    done = runner.invoke(hub_cli, ["tls", "init", str(out), "--host", "hub.example", "--host", "10.0.0.5",
                                   "--device", "dev-7", "--json"])  # fmt: skip
    assert done.exit_code == 0, done.output
    listed = json.loads(done.stdout)
    for key in (out / "ca.key", out / "server.key", out / "devices" / "dev-7.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    device = x509.load_pem_x509_certificate((out / "devices" / "dev-7.pem").read_bytes())
    for leaf in (server, device):
        leaf.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(n.value) for n in names} == {"hub.example", "10.0.0.5", "localhost", "127.0.0.1"}
    assert listed["hosts"] == ["hub.example", "10.0.0.5", "localhost", "127.0.0.1"]
    assert device.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "dev-7"
    assert not list(out.glob(".*.tmp")) and not list((out / "devices").glob(".*.tmp"))

    before = (out / "ca.pem").read_bytes(), (out / "ca.key").read_bytes()
    again = runner.invoke(hub_cli, ["tls", "init", str(out)])
    assert again.exit_code == 2 and "--force" in again.output and "Traceback" not in again.output
    assert ((out / "ca.pem").read_bytes(), (out / "ca.key").read_bytes()) == before  # the CA is untouched
    forced = runner.invoke(hub_cli, ["tls", "init", str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    assert (out / "ca.pem").read_bytes() != before[0]
    bad = runner.invoke(hub_cli, ["tls", "init", str(tmp_path / "x"), "--host", "not a host"])
    assert bad.exit_code == 2 and "--host" in bad.output and not (tmp_path / "x").exists()


# --- the embedded broker, the admin API and gRPC on one certificate ------------------------------------


def test_agent_enrolls_over_https_and_runs_over_mqtts_on_the_embedded_broker(tls_hub: Hub, pki: Pki,
                                                                             tmp_path: Path) -> None:  # fmt: skip
    assert tls_hub.broker_url.startswith("mqtts://") and tls_hub.control is not None
    wait_for("the hub on its own TLS broker", lambda: tls_hub.control is not None and tls_hub.control.mqtt.connected)
    state = tmp_path / "dev-1"
    config = enroll_device(tls_hub, pki, state, AgentTls(broker_ca=str(pki.good.ca_cert)))
    assert config.broker == tls_hub.broker_url and AgentConfig.load(state).broker_ca == str(pki.good.ca_cert)
    assert config.cloud == f"grpcs://{tls_hub.config.grpc_host}:{tls_hub.grpc_port}"  # its gRPC serves TLS too
    run_agent_until_online(tls_hub, state)


def test_the_embedded_broker_refuses_plain_mqtt_and_another_ca(tls_hub: Hub, pki: Pki) -> None:
    assert tls_hub.broker is not None and tls_hub.broker.tls_port is not None
    password = str(tls_hub.enroll(tls_hub.enroll_token([], {}, 60)["token"], "dev-1", PROFILE)["mqtt_password"])
    tls_port = tls_hub.broker.tls_port
    assert connect(tls_hub.broker_url, password, ca_file=str(pki.good.ca_cert)) < 5  # the control: accepted
    # plain MQTT to the TLS listener: no CONNACK, the broker only speaks TLS there
    assert "no MQTT CONNACK" in refused(f"mqtt://127.0.0.1:{tls_port}", password)
    # TLS-only: nothing listens on the plain port
    assert "cannot reach" in refused(f"mqtt://127.0.0.1:{tls_hub.config.broker_port}", password)
    # a client that trusts another CA refuses the hub's broker, naming the fix
    message = refused(tls_hub.broker_url, password, ca_file=str(pki.rogue.ca_cert))
    assert "not trusted" in message and "certificate verify failed" in message and "--broker-ca" in message


def test_sdk_calls_the_cloud_over_grpcs(tls_hub: Hub, pki: Pki, tmp_path: Path, keys: tuple[Path, Path]) -> None:
    admin = AdminClient(admin_url(tls_hub), operator_token(tls_hub.config.state_dir), ca=pki.good.ca_cert)
    admin.add_artifact(make_artifact(tmp_path / "gemm", keys[0]))  # an upload over https
    endpoint = f"grpcs://127.0.0.1:{tls_hub.grpc_port}"
    state = tmp_path / "device"
    (state / "trust").mkdir(parents=True)
    shutil.copy(keys[1], state / "trust")
    AgentConfig(device_id="dev-1", profile=PROFILE, cloud=endpoint, cloud_ca=str(pki.good.ca_cert)).save(state)
    with EdgeClient(state, policy="cloud_only", telemetry=False) as client:
        result = client.infer("gemm", {"input": X})
    assert result.route == "cloud" and result.outputs["output"].shape == (2, 30)
    for target, ca in ((endpoint, str(pki.rogue.ca_cert)), (f"grpc://127.0.0.1:{tls_hub.grpc_port}", None)):
        cloud = CloudClient(target, timeout_s=3, ca_file=ca)
        started = time.monotonic()
        with pytest.raises(CloudUnavailable):  # another CA's trust, or plaintext: refused, not hung
            cloud.infer("gemm", {"input": X})
        assert time.monotonic() - started < 10
        cloud.close()


def test_cli_talks_to_the_admin_api_over_https(tls_hub: Hub, pki: Pki) -> None:
    runner = CliRunner()
    url, state = admin_url(tls_hub), str(tls_hub.config.state_dir)
    assert url.startswith("https://")
    args = ["status", "--hub", url, "--state-dir", state, "--json"]
    done = runner.invoke(hub_cli, args, env={HUB_CA_ENV: str(pki.good.ca_cert)})
    assert done.exit_code == 0, done.output
    assert {"key": "broker", "value": tls_hub.broker_url} in json.loads(done.stdout)
    rogue = runner.invoke(hub_cli, args, env={HUB_CA_ENV: str(pki.rogue.ca_cert)})
    assert rogue.exit_code == 2 and "not trusted" in rogue.output and HUB_CA_ENV in rogue.output
    assert "Traceback" not in rogue.output
    plain = runner.invoke(hub_cli, ["status", "--hub", url.replace("https://", "http://"), "--state-dir", state],
                          env={HUB_CA_ENV: str(pki.good.ca_cert)})  # fmt: skip
    assert plain.exit_code == 2 and "is plain http://" in plain.output and "Traceback" not in plain.output
    assert tls_hub.admin is not None  # and a raw plaintext request gets no HTTP answer at all
    with socket.create_connection(("127.0.0.1", tls_hub.admin.port), timeout=10) as raw:
        raw.sendall(b"GET /v1/openapi.json HTTP/1.0\r\n\r\n")
        try:
            answer = raw.recv(4096)
        except ConnectionResetError:  # the TLS server drops the connection: as good as no answer
            answer = b""
        assert not answer.startswith(b"HTTP/"), answer
    missing = AdminClient(url, "t", ca="/nonexistent/ca.pem")
    with pytest.raises(HubError, match=f"{HUB_CA_ENV} /nonexistent/ca.pem: no such file"):
        missing.request("GET", "/v1/status")


# --- Mosquitto with the `cloud-hub broker-config` TLS listener (mTLS) ---------------------------------


@pytest.fixture
def mosquitto_tls(tmp_path: Path, keys: tuple[Path, Path], pki: Pki) -> Iterator[tuple[Hub, int]]:
    port, state, out = free_port(), _hub_state(tmp_path, keys), tmp_path / "mosquitto"
    good = pki.good
    done = CliRunner().invoke(hub_cli, ["broker-config", "--out", str(out), "--state-dir", str(state),
                                        "--tls-listen", f"127.0.0.1:{port}", "--tls-cert", str(good.server_cert),
                                        "--tls-key", str(good.server_key), "--tls-ca", str(good.ca_cert),
                                        "--require-certificate"])  # fmt: skip
    assert done.exit_code == 0, done.output
    conf = (out / "mosquitto.conf").read_text()
    assert f"listener {port} 127.0.0.1\ncertfile {good.server_cert.resolve()}" in conf
    assert conf.count("listener ") == 1 and "require_certificate true" in conf  # no plain listener
    process = subprocess.Popen([MOSQUITTO, "-c", str(out / "mosquitto.conf")], stderr=subprocess.DEVNULL)
    try:
        wait_for("mosquitto listening", lambda: _listening(port), 10)
        hub_pair = good.devices["edgefed-hub"]
        hub = Hub(HubConfig(state, broker=f"mqtts://127.0.0.1:{port}", broker_ca=good.ca_cert,
                            broker_cert=hub_pair[0], broker_key=hub_pair[1], grpc_port=0, admin_port=0))  # fmt: skip
        hub.start()
        try:
            yield hub, port
        finally:
            hub.stop()
    finally:
        process.terminate()
        process.wait(timeout=10)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def test_agent_runs_over_mutual_tls_on_mosquitto(mosquitto_tls: tuple[Hub, int], pki: Pki, tmp_path: Path) -> None:
    hub, port = mosquitto_tls
    wait_for("the hub on Mosquitto over TLS", lambda: hub.control is not None and hub.control.mqtt.connected)
    state = tmp_path / "dev-1"
    cert, key = pki.good.devices["dev-1"]
    config = enroll_device(hub, pki, state, AgentTls(broker_ca=str(pki.good.ca_cert), broker_cert=str(cert),
                                                      broker_key=str(key)))  # fmt: skip
    assert config.broker == f"mqtts://127.0.0.1:{port}" and config.broker_cert == str(cert)
    run_agent_until_online(hub, state)


def test_mosquitto_refuses_plain_mqtt_no_certificate_and_another_ca(mosquitto_tls: tuple[Hub, int],
                                                                    pki: Pki) -> None:  # fmt: skip
    hub, port = mosquitto_tls
    password = str(hub.enroll(hub.enroll_token([], {}, 60)["token"], "dev-1", PROFILE)["mqtt_password"])
    url, ca = f"mqtts://127.0.0.1:{port}", str(pki.good.ca_cert)
    cert, key = (str(p) for p in pki.good.devices["dev-1"])
    rogue_cert, rogue_key = (str(p) for p in pki.rogue.devices["dev-1"])
    assert connect(url, password, ca_file=ca, cert_file=cert, key_file=key) < 5  # the control: accepted
    refused(f"mqtt://127.0.0.1:{port}", password)  # plaintext to the TLS-only listener
    refused(url, password, ca_file=ca)  # TLS without a client certificate
    refused(url, password, ca_file=ca, cert_file=rogue_cert, key_file=rogue_key)  # another CA's client certificate
    message = refused(url, password, ca_file=str(pki.rogue.ca_cert), cert_file=cert, key_file=key)
    assert "not trusted" in message and "certificate verify failed" in message  # the broker's, checked by the client


# --- flags: clear errors naming the flag, before anything starts ----------------------------------------


def test_tls_flags_are_checked_with_clear_errors(tmp_path: Path, pki: Pki) -> None:
    runner = CliRunner()
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    good, rogue = pki.good, pki.rogue
    serve = ["serve", "--state-dir", str(tmp_path / "hub"), "--admin-port", "0", "--grpc-port", "0"]
    cases = {
        "--admin-tls needs a certificate": [*serve, "--admin-tls"],
        "--tls-cert": [*serve, "--tls-cert", str(garbage), "--tls-key", str(good.server_key)],
        "do not go together": [*serve, "--tls-cert", str(good.server_cert), "--tls-key", str(rogue.server_key)],
        "--broker-tls-only needs --broker-tls-port": [*serve, "--broker-tls-only"],
        "are for the embedded broker": [*serve, "--broker", "mqtt://127.0.0.1:1883", "--broker-tls-port", "8883",
                                        "--tls-cert", str(good.server_cert), "--tls-key", str(good.server_key)],
        "--broker-ca": [*serve, "--broker", "mqtts://127.0.0.1:8883", "--broker-ca", str(garbage)],
    }  # fmt: skip
    for expected, args in cases.items():
        done = runner.invoke(hub_cli, args)
        assert done.exit_code == 2, (args, done.output)
        assert expected in done.output and "Traceback" not in done.output, (expected, done.output)
    init = ["init", "--device-id", "dev-1", "--profile", PROFILE, "--trust", str(garbage)]
    agent_cases = {
        "--broker-ca": ["--broker", "mqtts://hub:8883", "--broker-ca", str(garbage)],
        "mqtts://host:port": ["--broker", "mqtt://hub:1883", "--broker-ca", str(good.ca_cert)],
        "--broker-cert and --broker-key go together": ["--broker", "mqtts://hub", "--broker-cert", str(good.ca_cert)],
    }  # fmt: skip
    for expected, extra in agent_cases.items():
        state = tmp_path / "device"
        done = runner.invoke(agent_cli, [*init, *extra, "--state-dir", str(state)])
        assert done.exit_code == 2 and expected in done.output and "Traceback" not in done.output, done.output
        assert not (state / "agent.json").exists()
