"""Alerts: the store on a real SQLite file, the webhook against real HTTP receivers, the admin routes
and the operator CLI against a real hub."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import MosquittoProcess, free_port, wait_for
from typer.testing import CliRunner

from cloud_hub.alerts import AlertStore, AlertWebhook
from cloud_hub.cli import app as hub_cli
from cloud_hub.errors import Conflict, HubError, NotFound
from cloud_hub.registry import SQLiteRegistry


def drift(store: AlertStore, key: str = "drift:m@1:all:pixel_3", score: float = 0.4) -> tuple[Any, bool]:
    return store.raise_alert(key, "drift", "warning", "m", "1.0.0", "all", f"pixel_3 drifted (PSI {score})",
                             {"feature": "pixel_3", "psi": score})  # fmt: skip


class Receiver:
    """A real HTTP server on a free port that records what is POSTed; ``status`` is what it answers."""

    def __init__(self, status: int = 200) -> None:
        self.posts: list[dict[str, Any]] = []
        self.status = status
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts.append({"body": json.loads(body), "type": self.headers["Content-Type"]})
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.stop()


def test_an_alert_is_deduplicated_by_key_until_resolved(tmp_path: Path) -> None:
    SQLiteRegistry(str(tmp_path / "registry.db"))  # the hub's file: the alerts table goes beside its tables
    store = AlertStore(str(tmp_path / "registry.db"))
    first, new = drift(store, score=0.3)
    assert new and first.state == "open" and first.count == 1 and first.first_seen == first.last_seen
    again, new = drift(store, score=0.5)
    assert not new and again.id == first.id and again.count == 2
    assert again.details == {"feature": "pixel_3", "psi": 0.5} and again.last_seen >= first.last_seen
    acked = store.ack(first.id, "ana")
    assert acked.state == "acknowledged" and acked.acknowledged_by == "ana" and acked.acknowledged_at
    assert drift(store)[0].count == 3  # an acknowledged alert still collects occurrences
    resolved = store.resolve(str(first.id), "ana")  # ids from a URL are strings
    assert resolved.state == "resolved" and resolved.resolved_by == "ana" and resolved.resolved_at
    reopened, new = drift(store)
    assert new and reopened.id != first.id and reopened.count == 1
    other, new = drift(store, key="drift:m@1:group:lab:pixel_3")
    assert new
    assert [a.id for a in store.list("open")] == [other.id, reopened.id]
    assert [a.id for a in store.list("resolved")] == [first.id]
    assert len(store.list()) == len(store.list("all")) == 3 and len(store.list("active")) == 2
    assert store.counts() == {("drift", "warning", "open"): 2}


def test_alerts_survive_reopening_the_file(tmp_path: Path) -> None:
    path = str(tmp_path / "registry.db")
    store = AlertStore(path)
    alert, _ = drift(store)
    store.ack(alert.id, "ana")
    store.close()
    reopened = AlertStore(path)
    assert reopened.get(alert.id).state == "acknowledged"
    assert not drift(reopened)[1]  # still deduplicated against the stored record


def test_unknown_ids_double_changes_and_bad_fields_are_named(tmp_path: Path) -> None:
    store = AlertStore(str(tmp_path / "registry.db"))
    with pytest.raises(NotFound, match="alert '42' is unknown; see 'cloud-hub alerts list"):
        store.get("42")
    with pytest.raises(NotFound, match="cloud-hub alerts list"):
        store.ack("nope", "ana")
    alert, _ = drift(store)
    store.resolve(alert.id, "ana")
    with pytest.raises(Conflict, match=f"alert {alert.id} is already resolved"):
        store.resolve(alert.id, "bo")
    with pytest.raises(Conflict, match="already resolved"):
        store.ack(alert.id, "bo")
    with pytest.raises(ValueError, match="'severity' is 'urgent'; use one of info, warning, critical"):
        store.raise_alert("k", "drift", "urgent", "m", "1", "all", "s", {})
    with pytest.raises(ValueError, match="'scope' must be a non-empty string"):
        store.raise_alert("k", "drift", "info", "m", "1", "", "s", {})
    with pytest.raises(ValueError, match="state 'closed' is not one of"):
        store.list("closed")


def test_the_webhook_gets_opened_acknowledged_and_resolved_not_updates(tmp_path: Path, receiver: Receiver) -> None:
    store = AlertStore(str(tmp_path / "registry.db"))
    webhook = AlertWebhook(receiver.url, timeout_s=2, attempts=2, backoff_s=0.05)
    store.subscribe(webhook)
    webhook.start()
    alert, _ = drift(store)
    drift(store)  # an update: no call
    store.ack(alert.id, "ana")
    store.resolve(alert.id, "ana")
    wait_for("three webhook calls", lambda: len(receiver.posts) == 3, 10)
    webhook.stop()
    assert [p["body"]["event"] for p in receiver.posts] == ["opened", "acknowledged", "resolved"]
    opened = receiver.posts[0]
    assert opened["type"] == "application/json" and opened["body"]["source"] == "edgefed-hub"
    assert opened["body"]["alert"]["id"] == alert.id and opened["body"]["alert"]["details"]["feature"] == "pixel_3"
    assert opened["body"]["alert"]["count"] == 1 and receiver.posts[1]["body"]["alert"]["count"] == 2
    assert webhook.delivered == 3 and not webhook.failures


def test_a_webhook_that_is_down_or_failing_never_blocks_and_is_counted(tmp_path: Path) -> None:
    store = AlertStore(str(tmp_path / "registry.db"))
    down = AlertWebhook(f"http://127.0.0.1:{free_port()}/hook", timeout_s=1, attempts=2, backoff_s=0.05)
    failing = Receiver(status=500)
    erroring = AlertWebhook(failing.url, timeout_s=1, attempts=3, backoff_s=0.05)
    for webhook in (down, erroring):
        store.subscribe(webhook)
        webhook.start()
    started = time.monotonic()
    for n in range(3):
        drift(store, key=f"k{n}")
    assert time.monotonic() - started < 0.5  # raising never waits for the receiver
    wait_for("failures counted", lambda: down.failures["unreachable"] == 3 and erroring.failures["http_status"] == 3)
    assert len(failing.posts) == 9  # three tries each
    assert down.delivered == erroring.delivered == 0
    full = AlertWebhook(failing.url, queue_size=1)  # not started: its queue fills
    alert = store.get(1)
    full("opened", alert)
    full("opened", alert)
    assert full.failures["queue_full"] == 1
    for webhook in (down, erroring):
        webhook.stop()
    failing.stop()
    with pytest.raises(HubError, match="--alert-webhook 'ftp://x': use an http:// or https:// URL"):
        AlertWebhook("ftp://x")


def _hub_cli(hub: Any, *args: str) -> Any:
    where = ["--hub", f"http://127.0.0.1:{hub.admin.port}", "--state-dir", str(hub.config.state_dir)]
    return CliRunner().invoke(hub_cli, ["alerts", *args, *where], env={"EDGEFED_HUB_TOKEN": ""})


def test_operators_list_ack_and_resolve_alerts_through_the_hub(hub: Any) -> None:
    alert, _ = drift(hub.alerts)
    other, _ = hub.alerts.raise_alert("latency:m@1", "latency", "critical", "m", "1.0.0", "group:lab",
                                      "p99 latency up 3x", {"p99_ms": 30})  # fmt: skip
    listed = _hub_cli(hub, "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert {a["id"] for a in json.loads(listed.stdout)} == {alert.id, other.id}
    table = _hub_cli(hub, "list")
    assert "pixel_3 drifted" in table.stdout and "m@1.0.0" in table.stdout and "group:lab" in table.stdout
    acked = _hub_cli(hub, "ack", str(alert.id), "--by", "ana", "--json")
    assert acked.exit_code == 0 and json.loads(acked.stdout)["acknowledged_by"] == "ana"
    assert [a["id"] for a in json.loads(_hub_cli(hub, "list", "--state", "open", "--json").stdout)] == [other.id]
    resolved = _hub_cli(hub, "resolve", str(alert.id))
    assert resolved.exit_code == 0 and f"alert {alert.id} resolved" in resolved.output
    twice = _hub_cli(hub, "resolve", str(alert.id))
    assert twice.exit_code == 2 and f"409 alert {alert.id} is already resolved" in twice.output
    unknown = _hub_cli(hub, "ack", "999")
    assert unknown.exit_code == 2 and "alert '999' is unknown; see 'cloud-hub alerts list" in unknown.output
    shown = json.loads(_hub_cli(hub, "show", str(other.id)).stdout)
    assert shown["details"] == {"p99_ms": 30} and shown["state"] == "open"
    assert [a["id"] for a in json.loads(_hub_cli(hub, "list", "--state", "resolved", "--json").stdout)] == [alert.id]
    audit = hub.registry.db.execute("SELECT actor, action FROM audit WHERE action LIKE 'alerts.%'").fetchall()
    assert [tuple(r) for r in audit] == [("ana", "alerts.ack"), (audit[1][0], "alerts.resolve")]


def test_alert_routes_need_the_operator_token_and_are_described(hub: Any) -> None:
    base = f"http://127.0.0.1:{hub.admin.port}"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{base}/v1/alerts")
    assert refused.value.code == 401
    token = (hub.config.state_dir / "operator.token").read_text().strip()
    request = urllib.request.Request(f"{base}/v1/alerts?state=closed", headers={"Authorization": f"Bearer {token}"})
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(request)
    assert bad.value.code == 400 and "state 'closed' is not one of" in json.loads(bad.value.read())["error"]
    with urllib.request.urlopen(f"{base}/v1/openapi.json") as response:
        paths = json.loads(response.read())["paths"]
    for path in ("/v1/alerts", "/v1/alerts/{id}", "/v1/alerts/{id}/ack", "/v1/alerts/{id}/resolve", "/metrics"):
        assert path in paths


def test_a_hub_with_a_webhook_posts_new_alerts(mosquitto: MosquittoProcess, tmp_path: Path,
                                               keys: tuple[Path, Path], receiver: Receiver) -> None:  # fmt: skip
    from cloud_hub.server import Hub, HubConfig

    state = tmp_path / "hub"
    (state / "trust").mkdir(parents=True)
    shutil.copy(keys[1], state / "trust")
    running = Hub(HubConfig(state, broker=mosquitto.url, grpc_port=0, admin_port=0, alert_webhook=receiver.url))
    running.start()
    try:
        alert, _ = drift(running.alerts)
        wait_for("the webhook call", lambda: receiver.posts, 10)
        assert receiver.posts[0]["body"]["event"] == "opened" and receiver.posts[0]["body"]["alert"]["id"] == alert.id
    finally:
        running.stop()
