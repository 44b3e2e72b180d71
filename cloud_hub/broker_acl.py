"""The embedded broker's authentication and topic ACL (amqtt plugins), imported only when amqtt is.

``CredentialsPlugin`` checks a username and password against the hub's password file (cloud_hub/mqtt_auth.py,
reread when it changes) and the client id against the username; ``TopicAclPlugin`` applies mqtt_auth's
``may_subscribe``/``may_publish``/``may_receive``. ``ConfinedBroker`` vets a CONNECT *before* amqtt
drops an existing session with the same client id: stock amqtt deletes it (clean session) and takes the
connection over before it authenticates, so one refused CONNECT with the id ``edgefed-hub`` would cut
the hub off. A refused connection gets a client id of its own (``!denied-...``) instead, and its
CONNACK says not authorized.
"""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action, BaseContext
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from amqtt.utils import gen_client_id

from cloud_hub.mqtt_auth import (
    DENIED_PREFIX,
    client_id_for,
    is_hub_user,
    may_publish,
    may_receive,
    may_subscribe,
    parse_passwd,
    verify_password,
)
from edge_agent.protocol.topics import DEFAULT_ROOT


class _PasswordFile:
    """The users of a password file, reread when the file changes (enrollment, removal, rotation)."""

    _cache: dict[str, _PasswordFile] = {}
    _cache_lock = threading.Lock()

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, str] = {}
        self._lock = threading.Lock()

    @classmethod
    def of(cls, path: str) -> _PasswordFile:
        with cls._cache_lock:
            return cls._cache.setdefault(path, cls(path))

    def users(self) -> dict[str, str]:
        with self._lock:
            try:
                st = os.stat(self.path)
                stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
                if stamp != self._stamp:
                    with open(self.path, encoding="utf-8") as f:
                        self._users = parse_passwd(f.read())
                    self._stamp = stamp
            except FileNotFoundError:
                self._users, self._stamp = {}, None
            return self._users


@dataclass
class ConfineConfig:
    password_file: str = ""
    allow_anonymous: bool = False
    topic_root: str = DEFAULT_ROOT


def connect_allowed(config: ConfineConfig, username: str | None, password: str | None, client_id: str | None) -> bool:
    """Whether a CONNECT with these credentials and client id may go ahead."""
    client_id = client_id or ""
    if client_id.startswith(DENIED_PREFIX):
        return False
    users = _PasswordFile.of(config.password_file).users()
    if not username:
        # anonymous (only with --allow-anonymous): never a client id that belongs to a user
        taken = is_hub_user(client_id) or (client_id.startswith("edgefed-") and client_id[len("edgefed-") :] in users)
        return config.allow_anonymous and not taken
    encoded = users.get(username)
    if encoded is None or not verify_password(password or "", encoded):
        return False
    return client_id == client_id_for(username)


class CredentialsPlugin(BaseAuthPlugin):  # type: ignore[misc]
    Config = ConfineConfig

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.confine: ConfineConfig = self.context.config  # type: ignore[assignment]

    async def authenticate(self, *, session: Session) -> bool | None:
        return connect_allowed(self.confine, session.username, session.password, session.client_id)


class TopicAclPlugin(BaseTopicPlugin):  # type: ignore[misc]
    Config = ConfineConfig

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.confine: ConfineConfig = self.context.config  # type: ignore[assignment]

    def _credentialed(self, device_id: str) -> bool:
        return device_id in _PasswordFile.of(self.confine.password_file).users()

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        if session is None or not topic:
            return False
        user = session.username or None
        root = self.confine.topic_root
        if action == Action.SUBSCRIBE:
            return may_subscribe(user, topic, root, self._credentialed)
        if action == Action.PUBLISH:
            return may_publish(user, topic, root, self._credentialed)
        if action == Action.RECEIVE:
            return may_receive(user, topic, root, self._credentialed)
        return False


class ConfinedBroker(Broker):  # type: ignore[misc]
    """amqtt's Broker whose CONNECT handling vets credentials and client id before touching sessions
    (a copy of amqtt 0.12's ``_initialize_client_session`` with that one step added)."""

    def _confine_config(self) -> ConfineConfig:
        plugins = self.config.get("plugins") or {}
        raw: dict[str, Any] = plugins.get("cloud_hub.broker_acl.CredentialsPlugin", {})
        return ConfineConfig(**raw)

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        try:
            handler, client_session = await BrokerProtocolHandler.init_from_connect(
                reader, writer, self.plugins_manager
            )
        except Exception:
            await writer.close()
            raise
        if not connect_allowed(self._confine_config(), client_session.username, client_session.password,
                               client_session.client_id):  # fmt: skip
            # a session of its own, so that nobody else's is deleted or taken over; CONNACK: not authorized
            client_session.client_id = f"{DENIED_PREFIX}{uuid.uuid4().hex}"
            client_session.clean_session = True
        if client_session.clean_session:
            if client_session.client_id:
                await self._delete_session(client_session.client_id)
            else:
                client_session.client_id = gen_client_id()
            client_session.parent = 0
        elif client_session.client_id in self._sessions:
            existing, _ = self._sessions[client_session.client_id]
            existing.will_flag = client_session.will_flag
            existing.will_message = client_session.will_message
            existing.will_topic = client_session.will_topic
            existing.will_qos = client_session.will_qos
            existing.keep_alive = client_session.keep_alive
            existing.username = client_session.username
            existing.password = client_session.password
            client_session = existing
            client_session.parent = 1
        else:
            client_session.parent = 0
        delay = self.config.get("timeout-disconnect-delay", 0)
        if client_session.keep_alive > 0 and isinstance(delay, int):
            client_session.keep_alive += delay
        return handler, client_session

    async def _handle_client_session(self, reader: Any, writer: Any, client_session: Session, *args: Any) -> None:
        try:
            await super()._handle_client_session(reader, writer, client_session, *args)
        finally:
            if (client_session.client_id or "").startswith(DENIED_PREFIX):
                self._sessions.pop(client_session.client_id, None)  # refused: nothing of it stays
