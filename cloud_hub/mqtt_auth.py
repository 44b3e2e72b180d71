"""Per-device MQTT credentials and the topic ACL every broker we start or configure enforces.

    STATE/mqtt/passwd          user:$7$... lines, Mosquitto's PBKDF2-SHA512 format (0600): the hub and
                               every enrolled device; passwords themselves are never stored by the hub
    STATE/mqtt/hub.password    the hub's own MQTT password (0600), made on first start
    STATE/mqtt/mosquitto.json  where ``cloud-hub broker-config`` wrote a Mosquitto configuration: each
                               change of the users rewrites that password file (atomically) and sends
                               SIGHUP to the pid in its pid file (a reload, not a restart)

A device's username is its device id, its client id must be ``edgefed-{device id}``; the hub is the user
``edgefed-hub`` with the client id ``edgefed-hub``, hub replica NAME the user and client id
``edgefed-hub.NAME`` (same password: ``hub.password``; none of them is a valid enrollment id). What each may do
(docs/security.md): a device reads ``{root}/devices/{its id}/#`` and ``{root}/artifacts/#`` and publishes
only ``reported``, ``status``, ``fetch``, ``telemetry``, ``desired/get`` and ``examples`` on its own
subtree; the hub reads and writes everything under the root.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import getpass
import hashlib
import hmac
import json
import logging
import os
import secrets
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from edge_agent.protocol.atomic import atomic_write_bytes
from edge_agent.protocol.topics import DEFAULT_ROOT, Topics

log = logging.getLogger(__name__)
HUB_USER = "edgefed-hub"  # the hub's username and its client id (a replica's: HUB_USER.NAME, hub_user())
RESERVED_IDS = frozenset({"hub", HUB_USER})  # device ids that would collide with the hub's client id or user
MQTT_DIR = "mqtt"
PASSWD_FILE = "passwd"
HUB_PASSWORD_FILE = "hub.password"
MOSQUITTO_LINK = "mosquitto.json"
DEVICE_PUBLISH = ("reported", "status", "fetch", "telemetry", "desired/get", "examples")
ITERATIONS = 101  # Mosquitto's default; the passwords are 256 random bits, so the count adds no safety
DENIED_PREFIX = "!denied-"  # the embedded broker renames a refused connection's client id to this


def hub_user(replica: str | None = None) -> str:
    """The hub's MQTT user: ``edgefed-hub``, or ``edgefed-hub.NAME`` for replica NAME (a user each, since
    Mosquitto ties the client id to the user: replicas sharing one would take each other's session)."""
    return HUB_USER if replica is None else f"{HUB_USER}.{replica}"


def is_hub_user(user: str | None) -> bool:
    return user is not None and (user == HUB_USER or user.startswith(f"{HUB_USER}."))


def reserved(device_id: str) -> bool:
    """Whether ``device_id`` would collide with the hub's (or a replica's) user or client id."""
    return device_id in RESERVED_IDS or is_hub_user(device_id)


def client_id_for(username: str) -> str:
    """The only client id ``username`` may connect with."""
    return username if is_hub_user(username) else f"edgefed-{username}"


def new_password() -> str:
    return secrets.token_urlsafe(32)


def hash_password(password: str, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """``$7$iterations$salt$hash`` (base64), the PBKDF2-SHA512 entry ``mosquitto_passwd`` writes."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        _, kind, iterations, salt, digest = encoded.split("$")
        if kind != "7" or not 1 <= int(iterations) <= 1_000_000:
            return False
        expected = base64.b64decode(digest)
        got = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations))
    except ValueError:  # (binascii.Error is a ValueError)
        return False
    return hmac.compare_digest(got, expected)


def parse_passwd(text: str) -> dict[str, str]:
    users = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and ":" in line:
            user, _, encoded = line.partition(":")
            users[user] = encoded
    return users


def format_passwd(users: dict[str, str]) -> bytes:
    return "".join(f"{user}:{encoded}\n" for user, encoded in sorted(users.items())).encode()


class MqttUsers:
    """The hub's MQTT users (itself and each enrolled device), kept in a Mosquitto password file."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / MQTT_DIR
        self.passwd = self.dir / PASSWD_FILE
        self._lock = threading.Lock()

    def _ensure_dir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One change at a time, in this process (threads) and across processes (the running hub and
        `cloud-hub devices rotate-mqtt` / `broker-config` on the same state directory)."""
        with self._lock:
            self._ensure_dir()
            fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def users(self) -> dict[str, str]:
        try:
            return parse_passwd(self.passwd.read_text())
        except FileNotFoundError:
            return {}

    def hub_credentials(self, replica: str | None = None) -> tuple[str, str]:
        """(username, password) of the hub or of its replica ``replica`` (``hub_user``), made (0600) on
        first use."""
        user = hub_user(replica)
        with self._locked():
            path = self.dir / HUB_PASSWORD_FILE
            if not path.exists():
                atomic_write_bytes(path, new_password().encode(), mode=0o600)
            password = path.read_text().strip()
            users = self.users()
            if not (user in users and verify_password(password, users[user])):
                users[user] = hash_password(password)
                self._write(users)
            return user, password

    def issue(self, device_id: str) -> str:
        """A new random password for ``device_id`` (replacing any other); only its hash is kept."""
        if reserved(device_id):
            raise ValueError(f"device id {device_id!r} is reserved for the hub")
        password = new_password()
        with self._locked():
            users = self.users()
            users[device_id] = hash_password(password)
            self._write(users)
        return password

    def remove(self, device_id: str) -> bool:
        with self._locked():
            users = self.users()
            if device_id not in users or is_hub_user(device_id):
                return False
            del users[device_id]
            self._write(users)
            return True

    def link_mosquitto(self, password_file: Path, pid_file: Path) -> None:
        """Keep ``password_file`` in step with these users and SIGHUP the pid in ``pid_file`` on changes."""
        with self._locked():
            link = {"password_file": str(password_file.resolve()), "pid_file": str(pid_file.resolve())}
            atomic_write_bytes(self.dir / MOSQUITTO_LINK, json.dumps(link).encode(), mode=0o600)
            self._write(self.users(), reload=False)  # (Mosquitto reads it when it starts)

    def _write(self, users: dict[str, str], reload: bool = True) -> None:
        data = format_passwd(users)
        atomic_write_bytes(self.passwd, data, mode=0o600)
        try:
            link = json.loads((self.dir / MOSQUITTO_LINK).read_text())
        except FileNotFoundError:
            return
        atomic_write_bytes(Path(link["password_file"]), data, mode=0o600)
        if reload:
            reload_mosquitto(Path(link["pid_file"]))


def reload_mosquitto(pid_file: Path) -> bool:
    """SIGHUP to the Mosquitto in ``pid_file``: it rereads its password and ACL files and drops clients
    whose credentials went. False (logged) when there is none running."""
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError) as exc:
        log.warning("cannot reload Mosquitto through %s (%s); it keeps its old users until reloaded", pid_file, exc)
        return False
    return True


# --- the topic ACL (the embedded broker's plugin uses these; the Mosquitto acl_file says the same) ---


def may_publish(user: str | None, topic: str, root: str, credentialed: Callable[[str], bool]) -> bool:
    """``user`` None: an anonymous client (only with --allow-anonymous): like a device, on the subtree of
    any device without credentials."""
    if is_hub_user(user):
        return topic.startswith(f"{root}/")
    parsed = Topics(root).parse_device_topic(topic)
    if parsed is None or parsed[1] not in DEVICE_PUBLISH:
        return False
    return parsed[0] == user if user is not None else not credentialed(parsed[0])


def may_subscribe(user: str | None, topic_filter: str, root: str, credentialed: Callable[[str], bool]) -> bool:
    """A device: filters inside its own subtree or the artifact chunk topics. An anonymous client: the
    artifact chunk topics, or the subtree of one device (named, no wildcard) without credentials — also
    because retained messages sent on a subscription skip the broker's per-delivery check."""
    if is_hub_user(user):
        return True
    if topic_filter.startswith(f"{root}/artifacts/"):
        return True
    if user is not None:
        return topic_filter.startswith(f"{root}/devices/{user}/")
    parsed = Topics(root).parse_device_topic(topic_filter)  # (an id level of + or # is not a device id)
    return parsed is not None and not credentialed(parsed[0])


def may_receive(user: str | None, topic: str, root: str, credentialed: Callable[[str], bool]) -> bool:
    if is_hub_user(user):
        return True
    if topic.startswith(f"{root}/artifacts/"):
        return True
    parsed = Topics(root).parse_device_topic(topic)
    if parsed is None:
        return False
    return parsed[0] == user if user is not None else not credentialed(parsed[0])


# --- Mosquitto ---

MOSQUITTO_TEMPLATE = """# written by `cloud-hub broker-config`; the hub rewrites {passwd} on enrollment and removal
# and sends SIGHUP to the pid in {pid_file}
per_listener_settings false
# the hub's user: Mosquitto must read the 0600 password file the hub rewrites
user {user}
{listeners}
allow_anonymous false
password_file {passwd}
acl_file {acl}
# the client id is the username: no client can take over another's (or the hub's) session
use_username_as_clientid true
pid_file {pid_file}
persistence true
persistence_location {dir}/
autosave_interval 5
max_queued_messages 1000000
max_queued_bytes 0
max_inflight_messages 100
message_size_limit 0
"""

ACL_TEMPLATE = """# written by `cloud-hub broker-config` (docs/security.md); %u is the username (= the device id)
# a device reads its own subtree and the artifact chunk topics ...
pattern read {root}/devices/%u/#
pattern read {root}/artifacts/#
# ... and publishes only these on its own subtree (desired, telemetry/ack, chunks: the hub's alone)
{device_writes}
{hubs}"""


def mosquitto_acl(root: str = DEFAULT_ROOT, replicas: Sequence[str] = ()) -> str:
    """The ACL: each device on its own subtree; the hub, and each of ``replicas`` (its own user), on all."""
    writes = "\n".join(f"pattern write {root}/devices/%u/{leaf}" for leaf in DEVICE_PUBLISH)
    hubs = "".join(f"user {hub_user(name)}\ntopic readwrite {root}/#\n" for name in (None, *replicas))
    return ACL_TEMPLATE.format(root=root, device_writes=writes, hubs=hubs)


def write_mosquitto_config(users: MqttUsers, out: Path, listeners: list[tuple[str, int]],
                           root: str = DEFAULT_ROOT, pid_file: Path | None = None,
                           tls_listeners: str = "", replicas: Sequence[str] = ()) -> Path:  # fmt: skip
    """Write ``out/mosquitto.conf``, ``out/acl`` and ``out/passwd`` (0600) and link the password file to
    ``users`` so enrollment and removal keep it current. Returns the configuration's path.
    ``tls_listeners``: listener blocks with TLS (cloud_hub/tls_serve.py ``mosquitto_tls_listeners``)."""
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    for name in (None, *replicas):  # the hub's user (and each replica's) is in the file from the start
        users.hub_credentials(name)
    pid = (pid_file or out / "mosquitto.pid").resolve()
    atomic_write_bytes(out / "acl", mosquitto_acl(root, replicas).encode(), mode=0o644)
    users.link_mosquitto(out / PASSWD_FILE, pid)  # writes out/passwd
    text = MOSQUITTO_TEMPLATE.format(
        listeners="\n".join([f"listener {port} {host}" for host, port in listeners] + [tls_listeners][:bool(
            tls_listeners)]),
        passwd=out / PASSWD_FILE, acl=out / "acl", pid_file=pid, dir=out, user=getpass.getuser(),
    )  # fmt: skip
    atomic_write_bytes(out / "mosquitto.conf", text.encode(), mode=0o644)
    return out / "mosquitto.conf"
