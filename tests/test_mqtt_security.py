"""Per-device MQTT credentials and confinement (issue 14), against a real Mosquitto started with the
configuration `cloud-hub broker-config` writes AND against the embedded broker: a device reads and writes
only its own subtree (and reads the artifact chunk topics), publishes none of the hub's topics, cannot
connect with another's credentials, anonymously or with the hub's client id, and a removed device cannot
connect at all. Every denial is proven against an allowed control that the same observer does receive."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import free_port, make_artifact, wait_for
from paho.mqtt.enums import CallbackAPIVersion
from typer.testing import CliRunner

from cloud_hub.api_client import AdminClient
from cloud_hub.cli import app as hub_cli
from cloud_hub.mqtt_auth import HUB_USER, MqttUsers, hash_password, verify_password
from cloud_hub.server import Hub, HubConfig, operator_token
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
from edge_agent.enroll import enroll
from edge_agent.protocol.manifest import now_text
from edge_agent.protocol.messages import ReportedState, Status, to_wire
from edge_agent.protocol.topics import Topics, shared
from edge_agent.store import ModelStore

ROOT = Topics()
PROFILE = "x86-64-generic"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def admin(hub: Hub) -> AdminClient:
    assert hub.admin is not None
    return AdminClient(f"http://127.0.0.1:{hub.admin.port}", operator_token(hub.config.state_dir))


class Probe:
    """A raw MQTT client that records its CONNACK, SUBACKs and messages."""

    def __init__(self, port: int, client_id: str, username: str | None = None, password: str | None = None) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.port = port
        self.connack: Any = None
        self.subacks: dict[int, list[int]] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.dropped = threading.Event()
        self.client.on_connect = lambda c, u, f, reason, p: setattr(self, "connack", reason)
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.subacks.__setitem__(mid, [r.value for r in codes])
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.client.on_disconnect = lambda c, u, f, r, p: self.dropped.set()

    def connect(self) -> bool:
        """True when the broker accepted the connection, False when it refused it (either must come)."""
        self.client.reconnect_delay_set(60, 60)
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        wait_for("a CONNACK", lambda: self.connack is not None or self.dropped.is_set(), 10)
        return self.connack is not None and not self.connack.is_failure

    def subscribe(self, topic_filter: str) -> int:
        """The SUBACK return code: the granted QoS, or 0x80 for a refused subscription."""
        _, mid = self.client.subscribe(topic_filter, qos=1)
        assert mid is not None
        wait_for(f"the SUBACK for {topic_filter}", lambda: mid in self.subacks, 10)
        return self.subacks[mid][0]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def got(self, topic: str, payload: bytes | None = None) -> bool:
        return any(t == topic and (payload is None or p == payload) for t, p in self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Fleet:
    """A hub on a confining broker with two enrolled devices, dev-A and dev-B (probes, not agents)."""

    def __init__(self, hub: Hub, port: int, kind: str) -> None:
        self.hub, self.port, self.kind = hub, port, kind
        self.passwords: dict[str, str] = {}
        self.seen: list[tuple[str, bytes]] = []  # everything the hub's own connection receives under the root
        assert hub.control is not None
        hub.control.mqtt.route(f"{ROOT.root}/#", lambda topic, payload: self.seen.append((topic, payload)))
        self.probes: list[Probe] = []

    def enroll(self, device_id: str, tmp: Path) -> AgentConfig:
        client = admin(self.hub)
        body = json.dumps({"groups": [], "tags": {}, "ttl_s": 60}).encode()
        token = str(client.request("POST", "/v1/enroll-tokens", body)["token"])
        config = enroll(client.url, token, device_id, PROFILE, tmp / device_id)
        assert config.mqtt_username == device_id and config.mqtt_password
        self.passwords[device_id] = config.mqtt_password
        return config

    def probe(self, device_id: str | None, client_id: str | None = None, password: str | None = None) -> Probe:
        probe = Probe(self.port, client_id or f"edgefed-{device_id or 'anonymous'}", device_id,
                      password if password is not None else self.passwords.get(device_id or ""))  # fmt: skip
        self.probes.append(probe)
        return probe

    def hub_saw(self, topic: str, payload: bytes) -> bool:
        return (topic, payload) in self.seen

    def denied_publish(self, device: Probe, device_id: str, topic: str, payload: bytes) -> None:
        """Publish on ``topic`` (retained: a late subscriber would get it too), then an allowed control
        message on the same connection: once the hub has the control, it would have had the first."""
        device.publish(topic, payload, retain=True)
        control = to_wire(Status("online", f"{now_text()} {os.urandom(4).hex()}"))
        device.publish(ROOT.status(device_id), control)
        wait_for("the allowed control message at the hub", lambda: self.hub_saw(ROOT.status(device_id), control), 10)
        assert not self.hub_saw(topic, payload), f"the broker let {device_id} publish on {topic}"

    def close(self) -> None:
        for probe in self.probes:
            probe.close()


def start_mosquitto(conf: Path, pid_file: Path, port: int) -> subprocess.Popen[bytes]:
    """Mosquitto in the foreground with the generated configuration; the pid file is written here, as a
    service manager would, when Mosquitto does not write it itself (it does only with -d)."""
    process = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stderr=subprocess.DEVNULL)
    wait_for("mosquitto listening", lambda: _listening(port), 10)
    if not pid_file.exists():
        pid_file.write_text(f"{process.pid}\n")
    return process


@pytest.fixture(params=["embedded", "mosquitto"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path, keys: tuple[Path, Path]) -> Iterator[Fleet]:
    state = tmp_path / "hub"
    (state / "trust").mkdir(parents=True)
    shutil.copy(keys[1], state / "trust")
    port = free_port()
    mosquitto = None
    if request.param == "mosquitto":
        if not Path(MOSQUITTO).exists():
            pytest.skip("mosquitto is not installed")
        out = tmp_path / "mosquitto"
        result = CliRunner().invoke(hub_cli, ["broker-config", "--out", str(out), "--state-dir", str(state),
                                              "--listen", f"127.0.0.1:{port}"])  # fmt: skip
        assert result.exit_code == 0, result.output
        mosquitto = start_mosquitto(out / "mosquitto.conf", out / "mosquitto.pid", port)
        config = HubConfig(state, broker=f"mqtt://127.0.0.1:{port}", grpc_port=0, admin_port=0)
    else:
        config = HubConfig(state, broker_port=port, grpc_port=0, admin_port=0)
    hub = Hub(config)
    hub.start()
    assert hub.control is not None and hub.control.mqtt.connected
    running = Fleet(hub, port, request.param)
    try:
        for device_id in ("dev-A", "dev-B"):
            running.enroll(device_id, tmp_path)
        yield running
    finally:
        running.close()
        hub.stop()
        if mosquitto is not None:
            mosquitto.send_signal(signal.SIGTERM)
            mosquitto.wait(timeout=10)


def _listening(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def test_a_device_reads_only_its_own_subtree_and_the_artifact_topics(fleet: Fleet) -> None:
    a = fleet.probe("dev-A")
    assert a.connect()
    assert fleet.hub.control is not None
    hub = fleet.hub.control.mqtt
    allowed = {ROOT.desired("dev-A"): "own desired", f"{ROOT.root}/devices/dev-A/#": "own subtree",
               ROOT.chunks("art-1"): "artifact chunks", f"{ROOT.root}/artifacts/#": "all artifact chunks"}  # fmt: skip
    for topic_filter in allowed:
        assert a.subscribe(topic_filter) == 1, topic_filter
    refused = [ROOT.desired("dev-B"), ROOT.telemetry("dev-B"), f"{ROOT.root}/devices/dev-B/#",
               f"{ROOT.root}/devices/+/desired", f"{ROOT.root}/devices/#", f"{ROOT.root}/#", "#"]  # fmt: skip
    codes = {topic_filter: a.subscribe(topic_filter) for topic_filter in refused}
    # the same publishes reach A on its own topics and not on B's: each refusal is proven by delivery
    for leaf in ("desired", "telemetry"):
        theirs, ours = ROOT.device("dev-B", leaf), ROOT.device("dev-A", leaf)
        hub.publish(theirs, f"for B {leaf}".encode()).wait_for_publish(10)
        hub.publish(ours, f"for A {leaf}".encode()).wait_for_publish(10)
        wait_for(f"A's own {leaf}", lambda ours=ours, leaf=leaf: a.got(ours, f"for A {leaf}".encode()), 10)  # type: ignore[misc]
    hub.publish(ROOT.chunks("art-1"), b"chunk").wait_for_publish(10)
    wait_for("the artifact chunk", lambda: a.got(ROOT.chunks("art-1"), b"chunk"), 10)
    assert not [t for t, _ in a.messages if "/dev-B/" in t], a.messages
    # the embedded broker also refuses them in the SUBACK; Mosquitto 2.0 grants them (MQTT 3.1.1) and checks
    # the ACL on each delivery instead, which the deliveries above prove
    assert set(codes.values()) == ({0x80} if fleet.kind == "embedded" else {1}), codes


def test_a_device_publishes_only_device_topics_on_its_own_subtree(fleet: Fleet) -> None:
    a = fleet.probe("dev-A")
    assert a.connect()
    forged = ReportedState(device_id="dev-B", profile=PROFILE, agent_version="0", updated_at=now_text())
    for topic in (ROOT.reported("dev-B"), ROOT.status("dev-B"), ROOT.telemetry("dev-B"), ROOT.fetch("dev-B"),
                  ROOT.desired("dev-B"), ROOT.desired("dev-A"), ROOT.telemetry_ack("dev-A"),
                  ROOT.examples_ack("dev-A"), ROOT.device_chunks("dev-A", "art-1"), ROOT.chunks("art-1"),
                  f"{ROOT.root}/devices/dev-A", f"{ROOT.root}/other", "elsewhere"):  # fmt: skip
        fleet.denied_publish(a, "dev-A", topic, to_wire(forged) + topic.encode())
    # and what it may publish arrives
    for leaf in ("reported", "fetch", "telemetry", "desired/get", "examples"):
        topic = ROOT.device("dev-A", leaf)
        a.publish(topic, b"x")
        wait_for(f"A's {leaf} at the hub", lambda topic=topic: fleet.hub_saw(topic, b"x"), 10)  # type: ignore[misc]


def test_the_hub_ignores_a_report_about_another_device(fleet: Fleet) -> None:
    before = fleet.hub.registry.device("dev-B")
    a = fleet.probe("dev-A")
    assert a.connect()
    forged = to_wire(ReportedState(device_id="dev-B", profile="rpi4-arm64", agent_version="0", updated_at=now_text()))
    fleet.denied_publish(a, "dev-A", ROOT.reported("dev-B"), forged)  # the broker stops it on B's topic
    assert fleet.hub.control is not None
    malformed = fleet.hub.control.mqtt.malformed
    a.publish(ROOT.reported("dev-A"), forged)  # on its own topic the broker lets it through: the hub ignores it
    wait_for(
        "the hub to refuse it", lambda: fleet.hub.control is not None and fleet.hub.control.mqtt.malformed > malformed
    )
    after = fleet.hub.registry.device("dev-B")
    assert (after["profile"], after["reported"]) == (before["profile"], before["reported"])


def test_no_connection_with_anothers_credentials_anonymously_or_as_the_hub(fleet: Fleet) -> None:
    b = fleet.probe("dev-B")
    assert b.connect()
    assert fleet.hub.control is not None
    refused = {
        "anonymous": fleet.probe(None, "edgefed-anonymous"),
        "anonymous as the hub": fleet.probe(None, HUB_USER),
        "B's username, A's password": fleet.probe("dev-B", "edgefed-dev-B", fleet.passwords["dev-A"]),
        "A with a wrong password": fleet.probe("dev-A", "edgefed-dev-A", "guessed"),
        "the hub's user, A's password": fleet.probe(HUB_USER, HUB_USER, fleet.passwords["dev-A"]),
        "an unknown user": fleet.probe("dev-Z", "edgefed-dev-Z", "x"),
    }
    for what, probe in refused.items():
        assert not probe.connect(), what
        assert probe.connack is not None and probe.connack.value in (4, 5, 134, 135), (what, probe.connack)
    # A's own credentials with the hub's or B's client id: refused (embedded), or given A's own client
    # id (Mosquitto: use_username_as_clientid); the hub and B stay connected either way
    for client_id in (HUB_USER, "edgefed-dev-B"):
        takeover = fleet.probe("dev-A", client_id)
        assert takeover.connect() is (fleet.kind == "mosquitto"), client_id
        time.sleep(0.5)
        takeover.close()
    assert fleet.hub.control.mqtt.connected and b.client.is_connected() and not b.dropped.is_set()
    # proven by traffic: B still gets its desired state, the hub still gets B's messages
    assert b.subscribe(ROOT.desired("dev-B")) == 1
    fleet.hub.control.mqtt.publish(ROOT.desired("dev-B"), b"still here").wait_for_publish(10)
    wait_for("B's desired state", lambda: b.got(ROOT.desired("dev-B"), b"still here"), 10)
    fleet.denied_publish(b, "dev-B", "nowhere", b"-")  # (its control message reaches the hub)


def test_a_removed_device_cannot_connect(fleet: Fleet) -> None:
    assert fleet.probe("dev-B").connect()
    admin(fleet.hub).request("DELETE", "/v1/devices/dev-B")
    assert "dev-B" not in MqttUsers(fleet.hub.config.state_dir).users()

    def refused() -> bool:  # Mosquitto rereads its password file on the SIGHUP the hub sent
        return not fleet.probe("dev-B").connect()

    wait_for("dev-B refused", refused, 10)
    assert fleet.probe("dev-A").connect()  # the others are untouched


def test_rotation_replaces_the_password(fleet: Fleet) -> None:
    new = fleet.hub.rotate_mqtt_password("dev-A")["mqtt_password"]
    wait_for("the old password refused", lambda: not fleet.probe("dev-A").connect(), 10)
    assert fleet.probe("dev-A", password=new).connect()


def test_a_deploy_works_end_to_end_with_credentials(fleet: Fleet, tmp_path: Path, keys: tuple[Path, Path]) -> None:
    state = tmp_path / "dev-A"
    config = AgentConfig.load(state)
    assert stat.S_IMODE((state / "agent.json").stat().st_mode) == 0o600  # it holds the broker password
    agent = Agent(state, config)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        client = admin(fleet.hub)
        client.add_artifact(make_artifact(tmp_path / "gemm", keys[0]))
        wait_for("dev-A online", lambda: fleet.hub.registry.device("dev-A")["status"] == "online")
        client.deploy("gemm", "1.0.0", "device:dev-A")

        def active() -> str | None:
            record = ModelStore(state / "models").active("gemm")
            return record.version if record else None

        wait_for("gemm 1.0.0 active on dev-A", lambda: active() == "1.0.0", 60)
    finally:
        agent.stop_event.set()
        thread.join(timeout=10)


def test_hub_secrets_are_0600_and_the_password_file_holds_only_hashes(fleet: Fleet) -> None:
    mqtt_dir = fleet.hub.config.state_dir / "mqtt"
    for name in ("passwd", "hub.password"):
        assert stat.S_IMODE((mqtt_dir / name).stat().st_mode) == 0o600, name
    text = (mqtt_dir / "passwd").read_text()
    assert fleet.passwords["dev-A"] not in text and "dev-A:$7$" in text


def test_password_hashes_are_mosquittos_pbkdf2_format() -> None:
    encoded = hash_password("secret", salt=b"0123456789ab")
    assert encoded.startswith("$7$101$") and verify_password("secret", encoded)
    assert not verify_password("Secret", encoded) and not verify_password("secret", "garbage")
    if shutil.which("mosquitto_passwd"):  # and ours verify mosquitto_passwd's
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"edgefed-passwd-{os.getpid()}"
        try:
            subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), "u", "pw"], check=True, capture_output=True)
            assert verify_password("pw", path.read_text().strip().partition(":")[2])
        finally:
            path.unlink(missing_ok=True)


def test_broker_config_writes_a_confining_mosquitto_configuration(tmp_path: Path) -> None:
    out = tmp_path / "conf"
    result = CliRunner().invoke(hub_cli, ["broker-config", "--out", str(out), "--state-dir", str(tmp_path / "hub")])
    assert result.exit_code == 0, result.output
    conf = (out / "mosquitto.conf").read_text()
    for line in ("allow_anonymous false", f"password_file {out.resolve()}/passwd", "use_username_as_clientid true",
                 "listener 1883 127.0.0.1", "max_queued_messages 1000000"):  # fmt: skip
        assert line in conf.splitlines(), line
    assert "pattern read edgefed/v1/devices/%u/#" in (out / "acl").read_text()
    assert stat.S_IMODE((out / "passwd").stat().st_mode) == 0o600
    assert (out / "passwd").read_text().startswith(f"{HUB_USER}:$7$")


def test_each_hub_replica_has_a_user_of_its_own_on_mosquitto(tmp_path: Path) -> None:
    """`broker-config --replica a --replica b`: the users edgefed-hub.a and edgefed-hub.b (the hub's
    password, the hub's rights) connect at once, where one shared user would lose its session to the other
    (Mosquitto ties the client id to the user), and split a shared subscription's messages; a device
    cannot take a replica's name."""
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed")
    state, out, port = tmp_path / "hub", tmp_path / "mosquitto", free_port()
    result = CliRunner().invoke(hub_cli, ["broker-config", "--out", str(out), "--state-dir", str(state), "--listen",
                                          f"127.0.0.1:{port}", "--replica", "a", "--replica", "b"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "user edgefed-hub.b\ntopic readwrite edgefed/v1/#" in (out / "acl").read_text()
    users = MqttUsers(state)
    device_password = users.issue("dev-A")
    with pytest.raises(ValueError):
        users.issue("edgefed-hub.c")
    mosquitto = start_mosquitto(out / "mosquitto.conf", out / "mosquitto.pid", port)
    probes: list[Probe] = []
    try:
        for name in ("a", "b"):
            user, password = users.hub_credentials(name)
            probes.append(Probe(port, user, user, password))
            assert probes[-1].connect(), user
            assert probes[-1].subscribe(shared(ROOT.all_devices("telemetry"))) == 1
        device = Probe(port, "edgefed-dev-A", "dev-A", device_password)
        assert device.connect()
        for i in range(40):
            device.publish(ROOT.telemetry("dev-A"), str(i).encode())
        replicas = probes[:2]
        probes.append(device)
        wait_for("each message at one replica", lambda: sum(len(p.messages) for p in replicas) == 40, 10)
        time.sleep(0.5)  # none comes twice
        assert sum(len(p.messages) for p in replicas) == 40 and all(p.messages for p in replicas)
        assert not any(p.dropped.is_set() for p in replicas)  # neither took the other's session
        probes.append(Probe(port, "edgefed-hub.a", "edgefed-hub.a", "not-the-password"))
        assert not probes[-1].connect()
    finally:
        for probe in probes:
            probe.close()
        mosquitto.send_signal(signal.SIGTERM)
        mosquitto.wait(timeout=10)


def test_allow_anonymous_keeps_old_lab_setups_working_but_not_against_enrolled_devices(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    """`serve --allow-anonymous`: clients without credentials get in (the old lab setups), but not with
    the hub's or an enrolled device's client id, and not onto an enrolled device's topics."""
    state = tmp_path / "hub"
    (state / "trust").mkdir(parents=True)
    shutil.copy(keys[1], state / "trust")
    port = free_port()
    hub = Hub(HubConfig(state, broker_port=port, grpc_port=0, admin_port=0, allow_anonymous=True))
    hub.start()
    fleet = Fleet(hub, port, "embedded")
    try:
        fleet.enroll("dev-A", tmp_path)
        legacy = fleet.probe(None, "edgefed-dev-old")
        assert legacy.connect()
        assert legacy.subscribe(ROOT.desired("dev-old")) == 1
        hub.control.mqtt.publish(ROOT.desired("dev-old"), b"legacy").wait_for_publish(10)  # type: ignore[union-attr]
        wait_for("the legacy device's desired state", lambda: legacy.got(ROOT.desired("dev-old"), b"legacy"), 10)
        for client_id in (HUB_USER, "edgefed-dev-A"):
            assert not fleet.probe(None, client_id).connect(), client_id
        fleet.denied_publish(legacy, "dev-old", ROOT.reported("dev-A"), b"forged")
        fleet.denied_publish(legacy, "dev-old", ROOT.desired("dev-old"), b"not the hub's")
        # dev-A's retained desired state stays unread: its subtree and wildcards over the devices are refused
        hub.control.mqtt.publish(ROOT.desired("dev-A"), b"secret", retain=True).wait_for_publish(10)  # type: ignore[union-attr]
        for topic_filter in (ROOT.desired("dev-A"), f"{ROOT.root}/devices/+/desired", f"{ROOT.root}/#", "#"):
            assert legacy.subscribe(topic_filter) == 0x80, topic_filter
        assert legacy.subscribe(f"{ROOT.root}/devices/dev-old/#") == 1
        hub.control.mqtt.publish(ROOT.desired("dev-A"), b"secret 2").wait_for_publish(10)  # type: ignore[union-attr]
        hub.control.mqtt.publish(ROOT.desired("dev-old"), b"after").wait_for_publish(10)  # type: ignore[union-attr]
        wait_for("the control delivery", lambda: legacy.got(ROOT.desired("dev-old"), b"after"), 10)
        assert not [t for t, _ in legacy.messages if "/dev-A/" in t], legacy.messages
    finally:
        fleet.close()
        hub.stop()
