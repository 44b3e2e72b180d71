"""A process that holds more than 1,024 files (a busy hub, a long-running app) still talks MQTT: paho's own
``select()`` refuses such descriptors and the client would never connect (paho.mqtt.python issue 819)."""

from __future__ import annotations

import os
import resource
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from common import MosquittoProcess

from edge_agent.mqtt import MqttConnection
from edge_agent.mqtt_poll import poll_select


@pytest.fixture
def thousand_files_held() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1400:
        pytest.fail(f"this test needs 1,400 open files; the hard limit here is {hard} (raise it with ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1400), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_client_whose_socket_is_above_1024_connects_and_round_trips(
    tmp_path: Path, thousand_files_held: None
) -> None:
    broker = MosquittoProcess(tmp_path)
    received = threading.Event()
    connection = MqttConnection(broker.url, "many-files")
    try:
        connection.route("t/echo", lambda topic, payload: received.set() if payload == b"hi" else None)
        connection.start(timeout_s=10)
        assert connection.client.socket().fileno() > 1024  # type: ignore[union-attr]
        connection.publish("t/echo", b"hi").wait_for_publish(5)
        assert received.wait(5), "the message published to our own subscription never came back"
    finally:
        connection.stop()
        broker.stop()


def test_poll_select_reports_what_select_reports() -> None:
    left, right = socket.socketpair()
    try:
        assert poll_select([left], [right], [], 0) == ([], [right], [])
        right.send(b"x")
        assert poll_select([left, right], [], [], 1.0) == ([left], [], [])
        right.close()
        readable, _, _ = poll_select([left], [], [], 1.0)
        assert readable == [left]  # a hang-up reads as readable, as with select
        with pytest.raises(ValueError):
            poll_select([right], [], [], 0)  # closed: fileno() is -1, as select would refuse
        with pytest.raises(TypeError):
            poll_select([None], [], [], 0)  # paho reads this as "connection lost"
    finally:
        left.close()
