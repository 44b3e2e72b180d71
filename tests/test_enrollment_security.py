"""Enrollment against a real hub (Mosquitto, real admin HTTP) and a fake one (issue 14, observation 3):
a plain token enrolls only a new device id; re-enrolling needs a token issued for that id; the device
pins the hub by the fingerprint its token carries and refuses a hub that answers with its own keys,
storing nothing."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import tree_digest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from typer.testing import CliRunner

from cloud_hub.cli import app as hub_cli
from cloud_hub.enroll_grants import key_fingerprint, sign_answer
from cloud_hub.server import Hub, operator_token
from edge_agent.enroll import enroll
from edge_agent.errors import ConfigError
from edge_agent.protocol.keyset import build, sign
from edge_agent.protocol.signing import public_key_from_pem

PROFILE = "x86-64-generic"


def url(hub: Hub) -> str:
    assert hub.admin is not None
    return f"http://127.0.0.1:{hub.admin.port}"


def cli_token(hub: Hub, *args: str) -> str:
    result = CliRunner().invoke(hub_cli, ["devices", "enroll-token", *args, "--hub", url(hub),
                                          "--token", operator_token(hub.config.state_dir)])  # fmt: skip
    assert result.exit_code == 0, result.output
    return result.output.strip()


def test_a_plain_token_cannot_take_over_an_enrolled_device(hub: Hub, tmp_path: Path) -> None:
    first = enroll(url(hub), cli_token(hub, "--group", "prod"), "dev-A", PROFILE, tmp_path / "a")
    before = hub.registry.device("dev-A")
    lab = cli_token(hub, "--group", "lab")
    with pytest.raises(ConfigError, match=r"403.*already enrolled.*--reenroll dev-A"):
        enroll(url(hub), lab, "dev-A", "raspberry-pi-4", tmp_path / "intruder")
    after = hub.registry.device("dev-A")
    assert (after["groups"], after["profile"]) == (before["groups"], before["profile"]) == (["prod"], PROFILE)
    assert not (tmp_path / "intruder" / "agent.json").exists()
    # the refused token is still good for what it is for: a new device
    assert enroll(url(hub), lab, "dev-B", PROFILE, tmp_path / "b").cloud_token not in (None, first.cloud_token)


def test_a_reenroll_token_enrolls_exactly_its_device(hub: Hub, tmp_path: Path) -> None:
    old = enroll(url(hub), cli_token(hub), "dev-A", PROFILE, tmp_path / "a")
    nobody = CliRunner().invoke(hub_cli, ["devices", "enroll-token", "--reenroll", "dev-nobody", "--hub", url(hub),
                                          "--token", operator_token(hub.config.state_dir)])  # fmt: skip
    assert nobody.exit_code != 0 and "dev-nobody" in nobody.output  # nothing to re-enroll
    again = cli_token(hub, "--reenroll", "dev-A", "--group", "lab")
    with pytest.raises(ConfigError, match=r"403.*re-enrolls only 'dev-A'"):
        enroll(url(hub), again, "dev-B", PROFILE, tmp_path / "b")
    new = enroll(url(hub), again, "dev-A", PROFILE, tmp_path / "a2")
    assert new.cloud_token and new.cloud_token != old.cloud_token
    assert hub.registry.device("dev-A")["groups"] == ["lab"]
    with pytest.raises(ConfigError, match="already used"):
        enroll(url(hub), again, "dev-A", PROFILE, tmp_path / "a3")


def test_the_token_pins_the_hub_key(hub: Hub, tmp_path: Path) -> None:
    token = cli_token(hub)
    fingerprint = token.partition(".")[2]
    assert fingerprint == key_fingerprint(hub.desired_signer.key.public_key()) and len(fingerprint) == 64
    enroll(url(hub), token, "dev-A", PROFILE, tmp_path / "a")
    assert (tmp_path / "a" / "hub-keys" / "hub.pub").read_text() == hub.desired_signer.public_pem
    with pytest.raises(ConfigError, match=r"cannot authenticate the hub.*SECRET\.FINGERPRINT.*https://"):
        enroll(url(hub), cli_token(hub).partition(".")[0], "dev-B", PROFILE, tmp_path / "b")  # no pin, plain HTTP
    assert not (tmp_path / "b").exists()


class FakeHub:
    """An HTTP server that answers enrollment like a hub, with keys of its own; ``tamper`` edits the
    answer it builds (to impersonate the real hub's key, or replay its answer)."""

    def __init__(self, tamper: Any = None) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.signing_pub = Ed25519PrivateKey.generate().public_key().public_bytes(
            Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()  # fmt: skip
        self.asked: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.asked.append(body)
                pem = fake.key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
                answer = {"device_id": body["device_id"], "profile": body["profile"], "topic_root": "edgefed",
                          "broker": "mqtt://evil:1883", "cloud": "grpc://evil:8001", "cloud_token": "t",
                          "trusted_keys": [fake.signing_pub], "hub_key": pem, "keyset": sign(build(
                              1, "now", [fake.key.public_key()], [public_key_from_pem(fake.signing_pub.encode())],
                              []), [fake.key]),
                          "token_sha256": hashlib.sha256(body["token"].encode()).hexdigest()}  # fmt: skip
                answer = sign_answer(answer, fake.key)
                answer = tamper(answer) if tamper else answer
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    fake = FakeHub()
    yield fake
    fake.stop()


def test_a_fake_hub_answering_with_its_own_keys_is_refused(hub: Hub, fake_hub: FakeHub, tmp_path: Path) -> None:
    state = tmp_path / "dev"
    state.mkdir()
    before = tree_digest(state)
    with pytest.raises(ConfigError, match=r"fingerprint.*the token pins.*refusing this hub"):
        enroll(fake_hub.url, cli_token(hub), "dev-A", PROFILE, state)
    assert fake_hub.asked and tree_digest(state) == before  # nothing stored: no keys, no agent.json


def test_an_answer_altered_under_the_real_hub_key_is_refused(hub: Hub, tmp_path: Path) -> None:
    def impersonate(answer: dict[str, Any]) -> dict[str, Any]:  # claims the real key, keeps its own signing key
        return {**answer, "hub_key": hub.desired_signer.public_pem}

    fake = FakeHub(impersonate)
    try:
        with pytest.raises(ConfigError, match=r"not signed by the pinned hub key"):
            enroll(fake.url, cli_token(hub), "dev-A", PROFILE, tmp_path / "dev")
    finally:
        fake.stop()
    assert not (tmp_path / "dev" / "trust").exists() and not (tmp_path / "dev" / "agent.json").exists()


def test_a_replayed_genuine_answer_is_refused(hub: Hub, tmp_path: Path) -> None:
    """A fake hub that recorded the real hub's signed answer to another enrollment cannot reuse it."""
    recorded = hub.enroll(cli_token(hub).partition(".")[0], "dev-X", PROFILE)
    fake = FakeHub(lambda answer: {**recorded, "device_id": answer["device_id"]})
    try:
        with pytest.raises(ConfigError, match=r"not signed by the pinned hub key"):
            enroll(fake.url, cli_token(hub), "dev-A", PROFILE, tmp_path / "a")  # device id changed: signature
    finally:
        fake.stop()
    fake = FakeHub(lambda answer: recorded)
    try:
        with pytest.raises(ConfigError, match=r"made for another token or device"):
            enroll(fake.url, cli_token(hub), "dev-X", PROFILE, tmp_path / "x")  # same id, another token
    finally:
        fake.stop()


def make_ca_and_cert(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate it signed for 127.0.0.1: (ca.pem, cert.pem, key.pem)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, issuer: str, public: Any, signer: Any, ca: bool) -> x509.Certificate:
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])).public_key(public)
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))  # fmt: skip
        if not ca:
            cert = cert.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                      critical=False)  # fmt: skip
        return cert.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    directory.mkdir(parents=True)
    ca_pem, cert_pem, key_pem = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca_pem.write_bytes(build(f"{name} CA", f"{name} CA", ca_key.public_key(), ca_key, True).public_bytes(Encoding.PEM))
    cert_pem.write_bytes(build("127.0.0.1", f"{name} CA", key.public_key(), ca_key, False).public_bytes(Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return ca_pem, cert_pem, key_pem


def test_over_https_the_ca_authenticates_the_hub(tmp_path: Path) -> None:
    """A hub over TLS (here an HTTPS server answering like one): enrolled with the right --ca and a token
    without fingerprint; refused with another CA's certificate, before any token is sent."""
    import ssl

    ca, cert, key = make_ca_and_cert(tmp_path / "good", "good")
    other_ca, _, _ = make_ca_and_cert(tmp_path / "other", "other")
    fake = FakeHub()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    fake.server.socket = context.wrap_socket(fake.server.socket, server_side=True)
    https = fake.url.replace("http://", "https://")
    try:
        with pytest.raises(ConfigError, match="CERTIFICATE_VERIFY_FAILED"):
            enroll(https, "secret", "dev-A", PROFILE, tmp_path / "refused", ca=other_ca)
        assert not fake.asked and not (tmp_path / "refused").exists()
        config = enroll(https, "secret", "dev-A", PROFILE, tmp_path / "dev", ca=ca)
        assert config.broker == "mqtt://evil:1883" and fake.asked == [
            {"token": "secret", "device_id": "dev-A", "profile": PROFILE}]  # fmt: skip
        with pytest.raises(ConfigError, match="not https"):
            enroll(fake.url, "secret.ab", "dev-A", PROFILE, tmp_path / "x", ca=ca)
    finally:
        fake.stop()
