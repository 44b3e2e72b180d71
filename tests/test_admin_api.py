"""The admin API on FastAPI over real HTTP: the caller's own token (/v1/whoami), live events (/v1/events, Server-
Sent Events read as the dashboard reads them: a fetch with the Authorization header), the dashboard's files,
validation errors that name the field, and a clean stop."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from cloud_hub.api import dashboard
from cloud_hub.api_client import AdminClient
from cloud_hub.errors import HubError


def url(hub: Any) -> str:
    return f"http://127.0.0.1:{hub.admin.port}"


def admin(hub: Any, token: str | None = None) -> AdminClient:
    return AdminClient(url(hub), token or (hub.config.state_dir / "operator.token").read_text().strip())


def test_whoami_names_the_callers_token(hub: Any) -> None:
    assert admin(hub).request("GET", "/v1/whoami") == {"name": "bootstrap", "role": "operator"}
    viewer = admin(hub).request("POST", "/v1/tokens", json.dumps({"name": "ana", "role": "viewer"}).encode())
    assert admin(hub, viewer["token"]).request("GET", "/v1/whoami") == {"name": "ana", "role": "viewer"}
    with pytest.raises(HubError, match="401"):
        admin(hub, "wrong").request("GET", "/v1/whoami")


class EventReader:
    """A GET /v1/events in a thread: the events as they come, parsed."""

    def __init__(self, hub: Any, token: str) -> None:
        self.events: list[tuple[str, Any]] = []
        self.comments: list[str] = []
        request = urllib.request.Request(f"{url(hub)}/v1/events", headers={"Authorization": f"Bearer {token}"})
        self.response = urllib.request.urlopen(request, timeout=30)
        self.ended = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        kind = None
        try:
            for raw in self.response:
                line = raw.decode().rstrip("\n")
                if line.startswith(":"):
                    self.comments.append(line)
                elif line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    self.events.append((kind or "message", json.loads(line.removeprefix("data: "))))
        except OSError:
            pass
        self.ended.set()

    def wait_for(self, what: str, found: Any, timeout_s: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for kind, data in list(self.events):
                if found(kind, data):
                    return data
            time.sleep(0.1)
        raise AssertionError(f"no {what} event in {timeout_s} s: {self.events}")


def test_events_stream_device_changes_and_end_when_the_hub_stops(hub: Any) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{url(hub)}/v1/events", timeout=10)
    assert refused.value.code == 401
    reader = EventReader(hub, (hub.config.state_dir / "operator.token").read_text().strip())
    assert reader.response.headers["Content-Type"].startswith("text/event-stream")
    time.sleep(1.5)  # the stream's first read of the registry
    hub.registry.upsert_device("dev-9", status="online", last_seen=time.time(), profile="x86-64-generic")
    seen = reader.wait_for("device", lambda kind, data: kind == "device" and data["device_id"] == "dev-9")
    assert seen["status"] == "online" and seen["active"] == {}
    hub.registry.upsert_device("dev-9", status="offline", last_seen=time.time())
    reader.wait_for("device offline", lambda kind, data: kind == "device" and data["status"] == "offline")
    assert reader.comments and reader.comments[0] == ": connected"
    started = time.monotonic()
    hub.admin.stop()
    assert reader.ended.wait(10), "the event stream did not end when the hub stopped"
    assert time.monotonic() - started < 8
    hub.admin.stop = lambda: None  # stopped: the fixture's hub.stop() must not stop it twice


def test_dashboard_files_are_served_without_a_token(hub: Any, tmp_path: Path) -> None:
    with urllib.request.urlopen(f"{url(hub)}/", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/html")
        page = response.read().decode()
    assert "<html" in page.lower()
    for escape in ("/static/../admin.py", "/static/%2e%2e/%2e%2e/admin.py", "/static/nope.js"):
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{url(hub)}{escape}", timeout=10)
        assert missing.value.code == 404, escape
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "app.js").write_text("x")
    assert dashboard.static_file((tmp_path / "site").resolve(), "app.js").name == "app.js"
    with pytest.raises(HubError):
        dashboard.static_file((tmp_path / "site").resolve(), "../site/../../etc/passwd")


def test_a_body_that_does_not_fit_names_the_field(hub: Any) -> None:
    client = admin(hub)
    cases = {
        b'{"model": "m", "version": 1, "target": "group:g"}': "field 'version'",
        b'{"model": "m", "target": "group:g"}': "field 'version'",
        b"[1, 2]": "must be a JSON object",
        b"{not json": "not JSON",
    }
    for body, message in cases.items():
        with pytest.raises(HubError, match="400") as refused:
            client.request("POST", "/v1/deployments", body)
        assert message in str(refused.value), (body, refused.value)
    with pytest.raises(HubError, match="field 'ttl_s'"):
        client.request("POST", "/v1/enroll-tokens", b'{"ttl_s": true}')
    with pytest.raises(HubError, match=r"field 'gates\.max_errors'"):
        client.request("POST", "/v1/rollouts", b'{"model": "m", "version": "1", "target": "group:g", '
                                               b'"gates": {"max_errors": 1}}')  # fmt: skip


def test_port_zero_and_a_clean_stop(hub: Any) -> None:
    port = hub.admin.port
    assert port > 0
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    assert {"GET /v1/openapi.json", "GET /v1/whoami", "GET /v1/events", "GET /"} <= {
        f"{r.method} {r.path}" for r in hub.admin.routes
    }
    document = admin(hub).request("GET", "/v1/openapi.json")
    assert document["openapi"].startswith("3.") and "/v1/whoami" in document["paths"]
    assert not any("422" in op.get("responses", {}) for ops in document["paths"].values() for op in ops.values())
    for hidden in ("/docs", "/redoc", "/openapi.json"):
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{url(hub)}{hidden}", timeout=10)
        assert missing.value.code == 404
