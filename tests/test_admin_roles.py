"""Roles on the admin API, named tokens, the append-only audit log and request body limits, over real HTTP.

The role test is driven by the hub's own route table: a route added without a rule (``Route.role``), or
with a rule other than the policy below, fails it.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cloud_hub.api_client import AdminClient
from cloud_hub.auth import DEPLOYER, OPERATOR, PUBLIC, RANK, ROLES, VIEWER
from cloud_hub.cli import app as hub_cli
from cloud_hub.errors import HubError

ROOT = Path(__file__).resolve().parents[1]
# The policy. Deployers change what runs where; viewers read everything but secrets.
DEPLOYER_ROUTES = {"POST /v1/deployments", "POST /v1/rollbacks", "POST /v1/rollouts", "POST /v1/rollouts/{id}/{action}",
                   "POST /v1/ab", "POST /v1/ab/{id}/{action}",
                   "GET /v1/artifacts/{artifact_id}/files/{path}"}  # fmt: skip  # the last: a model's weights
SECRET_READS = {"GET /v1/tokens", "GET /v1/examples/{id}/npz"}  # operator only
PUBLIC_ROUTES = {"GET /v1/openapi.json", "POST /v1/enroll", "GET /", "GET /static/{path}"}  # the dashboard's files
STREAMS = {"/v1/events"}  # answers text/event-stream until the client leaves


def expected_role(method: str, path: str) -> str:
    key = f"{method} {path}"
    if key in PUBLIC_ROUTES:
        return PUBLIC
    if key in DEPLOYER_ROUTES:
        return DEPLOYER
    if method == "GET" and key not in SECRET_READS:
        return VIEWER
    return OPERATOR


def raw_request(port: int, head: str, body: bytes = b"", timeout_s: float = 10.0) -> tuple[int, dict[str, Any]]:
    """One HTTP request written by hand (headers exactly as given); the status and JSON reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as conn:
        conn.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    header, _, payload = data.partition(b"\r\n\r\n")
    try:
        reply = json.loads(payload or b"{}")
    except ValueError:  # /metrics, an .npz
        reply = {"raw": payload[:200]}
    return int(header.split()[1]), reply


def stream_status(port: int, path: str, token: str | None) -> tuple[int, Any]:
    """The status and content type of a GET that streams (read up to the end of its head, then left)."""
    auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
            data += chunk
    head = data.partition(b"\r\n\r\n")[0].decode().lower()
    return int(head.split()[1]), {"content-type": re.search(r"content-type: ([^\r]+)", head).group(1)}  # type: ignore[union-attr]


def call(port: int, method: str, path: str, token: str | None, body: bytes | None = None) -> tuple[int, Any]:
    if method == "GET" and path in STREAMS and token is not None:
        status, head = stream_status(port, path, token)
        if status == 200:
            assert head["content-type"].startswith("text/event-stream"), head
            return status, head
    if body is None and method == "POST":
        body = b"{}"
    auth = f"Authorization: Bearer {token}\n" if token is not None else ""
    length = f"Content-Length: {len(body)}\n" if body is not None else ""
    status, reply = raw_request(port, f"{method} {path} HTTP/1.1\nHost: x\n{auth}{length}Connection: close\n",
                                body or b"")  # fmt: skip
    return status, reply


@pytest.fixture
def tokens(hub: Any) -> dict[str, str]:
    """A token per role (named after it) plus a revoked one, created through the API with the bootstrap token."""
    admin = AdminClient(f"http://127.0.0.1:{hub.admin.port}", (hub.config.state_dir / "operator.token").read_text())
    made = {}
    for role in (*ROLES, "revoked"):
        body = json.dumps({"name": f"t-{role}", "role": "viewer" if role == "revoked" else role}).encode()
        made[role] = admin.request("POST", "/v1/tokens", body)["token"]
    admin.request("POST", "/v1/tokens/t-revoked/revoke", b"{}")
    return made


def test_every_route_has_the_policy_rule(hub: Any) -> None:
    for route in hub.admin.routes:
        assert route.role in RANK, f"{route.method} {route.path} has no role rule (Route.role)"
        assert route.role == expected_role(route.method, route.path), f"{route.method} {route.path}: {route.role}"
    documented = hub.admin.app.openapi()["paths"]  # the document is made from the routes themselves
    for route in hub.admin.routes:
        assert route.method.lower() in documented.get(route.path, {}), f"{route.method} {route.path} not in OpenAPI"


def test_every_route_times_every_role(hub: Any, tokens: dict[str, str]) -> None:
    port = hub.admin.port
    callers: dict[str, str | None] = {"none": None, "unknown": "not-a-token", **tokens}
    for route in hub.admin.routes:
        path = re.sub(r"\{(\w+)\}", lambda m: "pause" if m.group(1) == "action" else "nope", route.path)
        for caller, token in callers.items():
            status, reply = call(port, route.method, path, token)
            where = f"{caller} → {route.method} {route.path}: {status} {reply}"
            if route.role == PUBLIC:
                assert status not in (401,) and "needs role" not in str(reply), where
            elif caller in ("none", "unknown", "revoked"):
                assert status == 401, where
                assert "missing, unknown or revoked admin token" in reply["error"], where
            elif RANK[caller] < RANK[route.role]:
                assert status == 403, where
                assert f"needs role {route.role}" in reply["error"] and f"t-{caller}" in reply["error"], where
            else:  # allowed: it ran (200) or refused the input (4xx), never for want of rights
                assert status not in (401, 403) and status < 500, where


def test_tokens_over_http(hub: Any, tokens: dict[str, str]) -> None:
    port = hub.admin.port
    listed = {t["name"]: t for t in call(port, "GET", "/v1/tokens", tokens[OPERATOR])[1]}
    assert {"t-viewer", "t-deployer", "t-operator", "t-revoked"} <= set(listed)
    assert listed["t-revoked"]["revoked"] and not listed["t-viewer"]["revoked"]
    assert listed["t-operator"]["last_used"] is not None  # it made this very call
    assert not any("token" in row for row in listed.values())
    rows = hub.registry.db.execute("SELECT token_sha256 FROM admin_tokens WHERE name = 't-viewer'").fetchall()
    assert rows[0][0] == hashlib.sha256(tokens[VIEWER].encode()).hexdigest()
    db_bytes = b"".join(p.read_bytes() for p in hub.config.state_dir.glob("registry.db*"))
    assert not any(t.encode() in db_bytes for t in tokens.values())  # only hashes are stored

    again = call(port, "POST", "/v1/tokens", tokens[OPERATOR], b'{"name": "t-viewer", "role": "viewer"}')
    assert again[0] == 409 and "revoke it first" in again[1]["error"]
    reused = call(port, "POST", "/v1/tokens", tokens[OPERATOR], b'{"name": "t-revoked", "role": "viewer"}')
    assert reused[0] == 409 and "not reused" in reused[1]["error"]
    bad_role = call(port, "POST", "/v1/tokens", tokens[OPERATOR], b'{"name": "x", "role": "admin"}')
    assert bad_role[0] == 400 and "use one of viewer, deployer, operator" in bad_role[1]["error"]
    bad_name = call(port, "POST", "/v1/tokens", tokens[OPERATOR], b'{"name": "bootstrap", "role": "viewer"}')
    assert bad_name[0] == 400
    by_deployer = call(port, "POST", "/v1/tokens", tokens[DEPLOYER], b'{"name": "mine", "role": "operator"}')
    assert by_deployer[0] == 403 and "needs role operator" in by_deployer[1]["error"]

    assert call(port, "GET", "/v1/status", tokens[VIEWER])[0] == 200
    assert call(port, "POST", "/v1/tokens/t-viewer/revoke", tokens[OPERATOR])[0] == 200
    assert call(port, "GET", "/v1/status", tokens[VIEWER])[0] == 401
    twice = call(port, "POST", "/v1/tokens/t-viewer/revoke", tokens[OPERATOR])
    assert twice[0] == 409 and "already revoked" in twice[1]["error"]
    unknown = call(port, "POST", "/v1/tokens/ghost/revoke", tokens[OPERATOR])
    assert unknown[0] == 404 and "cloud-hub tokens list" in unknown[1]["error"]


def test_tokens_and_audit_through_the_cli(hub: Any) -> None:
    common = ["--hub", f"http://127.0.0.1:{hub.admin.port}", "--state-dir", str(hub.config.state_dir)]
    runner = CliRunner()
    made = runner.invoke(hub_cli, ["tokens", "create", "ci-bot", "--role", "deployer", "--json", *common])
    assert made.exit_code == 0, made.output
    secret = json.loads(made.stdout)["token"]
    plain = runner.invoke(hub_cli, ["tokens", "create", "alice", "--role", "viewer", *common])
    assert plain.exit_code == 0 and len(plain.stdout.strip()) >= 40, plain.output
    bad = runner.invoke(hub_cli, ["tokens", "create", "eve", "--role", "root", *common])
    assert bad.exit_code == 2 and "use one of operator, deployer, viewer" in bad.output

    listed = runner.invoke(hub_cli, ["tokens", "list", "--json", *common])
    assert {r["name"]: r["role"] for r in json.loads(listed.stdout)} == {"ci-bot": "deployer", "alice": "viewer"}
    assert secret not in listed.stdout
    table = runner.invoke(hub_cli, ["tokens", "list", *common])
    assert "ci-bot" in table.stdout and "deployer" in table.stdout

    # the deployer may deploy (refused here: no such model) but not enroll devices; both are audited
    as_bot = ["--hub", common[1], "--token", secret]
    deploy = runner.invoke(hub_cli, ["deploy", "ghost@1.0.0", "--to", "group:lab", *as_bot])
    assert deploy.exit_code != 0 and "needs role" not in deploy.output
    enroll = runner.invoke(hub_cli, ["devices", "enroll-token", *as_bot])
    assert enroll.exit_code != 0 and "403" in enroll.output and "needs role operator" in enroll.output

    revoked = runner.invoke(hub_cli, ["tokens", "revoke", "ci-bot", *common])
    assert revoked.exit_code == 0 and "revoked ci-bot" in revoked.stdout
    after = runner.invoke(hub_cli, ["status", *as_bot])
    assert after.exit_code != 0 and "401" in after.output

    audit = runner.invoke(hub_cli, ["audit", "--since", "1h", "--json", *common])
    assert audit.exit_code == 0, audit.output
    entries = [e for e in json.loads(audit.stdout) if e["action"].startswith(("POST ", "DELETE "))]
    seen = [(e["actor"], e["action"], e["detail"]["outcome"]) for e in entries]
    assert ("bootstrap", "POST /v1/tokens", "ok") in seen
    assert ("ci-bot", "POST /v1/deployments", "error") in seen
    assert ("ci-bot", "POST /v1/enroll-tokens", "error") in seen
    assert ("bootstrap", "POST /v1/tokens/{name}/revoke", "ok") in seen
    assert secret not in audit.stdout
    shown = runner.invoke(hub_cli, ["audit", *common])
    assert shown.exit_code == 0 and "ci-bot" in shown.stdout and "POST /v1/deployments" in shown.stdout
    future = runner.invoke(hub_cli, ["audit", "--since", str(time.time() + 3600), "--json", *common])
    assert json.loads(future.stdout) == []


def test_audit_entry_for_each_change(hub: Any, tokens: dict[str, str]) -> None:
    port = hub.admin.port
    assert call(port, "POST", "/v1/enroll-tokens", tokens[OPERATOR], b'{"groups": ["lab"]}')[0] == 200
    assert call(port, "POST", "/v1/deployments", tokens[DEPLOYER],
                b'{"model": "ghost", "version": "1.0.0", "target": "group:lab"}')[0] in (400, 404, 409)  # fmt: skip
    assert call(port, "POST", "/v1/rollouts/r-1/pause", tokens[VIEWER])[0] == 403
    assert call(port, "DELETE", "/v1/devices/dev-x", tokens[OPERATOR])[0] == 404
    assert call(port, "POST", "/v1/ab", None, b"{}")[0] == 401
    assert call(port, "POST", "/v1/enroll", None, b'{"token": "nope", "device_id": "d", "profile": "x"}')[0] >= 400
    assert call(port, "GET", "/v1/status", tokens[VIEWER])[0] == 200  # reads are not audited

    status, entries = call(port, "GET", "/v1/audit", tokens[VIEWER])
    assert status == 200
    api = {e["action"]: e for e in entries if " /" in e["action"]}
    assert "GET /v1/status" not in api
    enroll_token = api["POST /v1/enroll-tokens"]
    assert enroll_token["actor"] == "t-operator" and enroll_token["detail"]["outcome"] == "ok"
    assert enroll_token["detail"]["targets"]["groups"] == ["lab"]
    own = [e for e in entries if e["action"] == "devices.enroll-token"]  # the hub's own entry: the same token
    assert [e["actor"] for e in own] == ["t-operator"]
    deploy = api["POST /v1/deployments"]["detail"]
    assert api["POST /v1/deployments"]["actor"] == "t-deployer" and deploy["outcome"] == "error"
    assert deploy["targets"] == {"model": "ghost", "version": "1.0.0", "target": "group:lab"}
    assert deploy["status"] >= 400 and deploy["error"]
    pause = api["POST /v1/rollouts/{id}/{action}"]
    assert pause["actor"] == "t-viewer" and pause["detail"]["status"] == 403
    assert pause["detail"]["targets"] == {"id": "r-1", "action": "pause"}
    remove = api["DELETE /v1/devices/{id}"]
    assert remove["actor"] == "t-operator" and remove["detail"]["status"] == 404
    assert api["POST /v1/ab"]["actor"] == "anonymous" and api["POST /v1/ab"]["detail"]["status"] == 401
    assert api["POST /v1/enroll"]["detail"]["targets"]["device_id"] == "d"
    assert "nope" not in json.dumps(api["POST /v1/enroll"])  # the enrollment token is never recorded
    assert all(e["ts"] <= time.time() for e in entries)
    since = call(port, "GET", f"/v1/audit?since={time.time() + 60}", tokens[VIEWER])
    assert since == (200, [])


def test_the_audit_log_is_append_only(hub: Any) -> None:
    hub.registry.audit("someone", "test", {"x": 1})
    db = sqlite3.connect(hub.config.state_dir / "registry.db")
    triggers = {
        r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit'")
    }
    assert triggers == {"audit_no_update", "audit_no_delete"}
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE audit SET actor = 'mallory'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM audit")
    assert db.execute("SELECT count(*) FROM audit WHERE actor = 'someone'").fetchone()[0] == 1
    db.close()
    for source in (ROOT / "cloud_hub").rglob("*.py"):  # and no code path tries
        text = source.read_text()
        assert not re.search(r"(UPDATE\s+audit\b|DELETE\s+FROM\s+audit\b)", text, re.I), source


def test_body_limits(hub: Any, tokens: dict[str, str]) -> None:
    port = hub.admin.port
    status, reply = raw_request(port, "POST /v1/enroll HTTP/1.1\nHost: x\nContent-Length: -1\n", b"{}" * 100)
    assert status == 400 and "not a size in bytes" in reply["error"]
    started = time.monotonic()  # nothing sent beyond the headers: refused without waiting for the body
    status, reply = raw_request(port, "POST /v1/enroll HTTP/1.1\nHost: x\nContent-Length: 1000000000\n")
    assert status == 413 and "takes at most 16384 bytes" in reply["error"]
    assert time.monotonic() - started < 5
    status, reply = raw_request(port, "POST /v1/enroll HTTP/1.1\nHost: x\n")
    assert status == 411 and "Content-Length" in reply["error"]
    status, reply = raw_request(port, "POST /v1/enroll HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n", b"0\r\n\r\n")
    assert status == 411 and "chunked" in reply["error"]
    status, reply = raw_request(port, "POST /v1/enroll HTTP/1.1\nHost: x\nContent-Length: abc\n")
    assert status == 400
    auth = f"Authorization: Bearer {tokens[OPERATOR]}\n"
    status, reply = raw_request(port, f"POST /v1/deployments HTTP/1.1\nHost: x\n{auth}Content-Length: 2000000\n")
    assert status == 413 and "takes at most 1048576 bytes" in reply["error"]
    status, reply = raw_request(port, f"GET /v1/status HTTP/1.1\nHost: x\n{auth}Content-Length: 10\n", b"x" * 10)
    assert status == 413 and "takes no body" in reply["error"]
    status, reply = raw_request(port, f"POST /v1/artifacts HTTP/1.1\nHost: x\n{auth}Content-Length: {1 << 40}\n")
    assert status == 413
    entries = call(port, "GET", "/v1/audit", tokens[VIEWER])[1]
    refused = [e["detail"]["status"] for e in entries if e["action"] == "POST /v1/enroll"]
    assert sorted(refused) == [400, 400, 411, 411, 413]
    # a normal call still works after all that
    with pytest.raises(HubError, match="401"):
        AdminClient(f"http://127.0.0.1:{port}", "wrong").request("GET", "/v1/status")
