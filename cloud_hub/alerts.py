"""Alerts: records with a state, deduplicated by a key, stored in the hub's registry database
(``Registry.sql_db()``: SQLite's registry.db or PostgreSQL, shared by hub replicas).

An alert's life is ``open`` → ``acknowledged`` (optional) → ``resolved``. Raising an alert whose key
already has an open or acknowledged alert updates that one (``last_seen``, ``count`` + 1, the latest
summary and details) instead of opening another; once it is resolved, the same key opens a new alert.
A partial unique index holds at most one unresolved alert per key (raising is one ``INSERT ... ON CONFLICT
(key) WHERE state != 'resolved' DO UPDATE``, so two replicas raising the same key together make one
alert), and every change is one transaction (an acknowledgement or resolution locks its row: ``SELECT
... FOR UPDATE``; SQLite: ``BEGIN IMMEDIATE``), so a crash leaves either the old or the new record.

Listeners (``AlertStore.subscribe``) hear ``opened``, ``acknowledged`` and ``resolved`` after the
change is committed; ``AlertWebhook`` is one: it POSTs each event as JSON from a background thread.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass
from typing import Any

from cloud_hub.errors import Conflict, HubError, NotFound
from cloud_hub.sqldb import Row, SqlDb, Tx, open_db

log = logging.getLogger(__name__)
STATES = ("open", "acknowledged", "resolved")
SEVERITIES = ("info", "warning", "critical")
MAX_DETAILS_BYTES = 64 * 1024
_TABLE = """CREATE TABLE IF NOT EXISTS alerts (
    id {id},
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    severity TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    scope TEXT NOT NULL,
    summary TEXT NOT NULL,
    details TEXT NOT NULL,
    state TEXT NOT NULL,
    first_seen {real} NOT NULL,
    last_seen {real} NOT NULL,
    count INTEGER NOT NULL,
    acknowledged_at {real},
    acknowledged_by TEXT,
    resolved_at {real},
    resolved_by TEXT
)"""
_INDEXES = (
    "CREATE UNIQUE INDEX IF NOT EXISTS alerts_unresolved_key ON alerts (key) WHERE state != 'resolved'",
    "CREATE INDEX IF NOT EXISTS alerts_state ON alerts (state, last_seen)",
)
_SQLITE = (_TABLE.format(id="INTEGER PRIMARY KEY AUTOINCREMENT", real="REAL"), *_INDEXES)
_POSTGRES = (_TABLE.format(id="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", real="DOUBLE PRECISION"), *_INDEXES)
_RAISE = (
    "INSERT INTO alerts (key, kind, severity, model, version, scope, summary, details, state, first_seen, last_seen, "
    "count) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'open', ?, ?, 1) ON CONFLICT (key) WHERE state != 'resolved' DO UPDATE "
    "SET severity = excluded.severity, summary = excluded.summary, details = excluded.details, "
    "last_seen = excluded.last_seen, count = alerts.count + 1 RETURNING id, count"
)


@dataclass(frozen=True)
class Alert:
    id: int
    key: str  # what deduplicates: e.g. "drift:digits-cnn@1.0.0:group:lab:input/pixel_12"
    kind: str  # e.g. "drift", "latency", "errors"
    severity: str  # info | warning | critical
    model: str
    version: str
    scope: str  # "all", "group:G", "tag:K=V", "device:ID"
    summary: str
    details: dict[str, Any]
    state: str  # open | acknowledged | resolved
    first_seen: float
    last_seen: float
    count: int
    acknowledged_at: float | None = None
    acknowledged_by: str | None = None
    resolved_at: float | None = None
    resolved_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Listener = Callable[[str, Alert], None]


class AlertStore:
    """Alerts in the ``alerts`` table of the registry's database (``db``: its ``sql_db()``, or a SQLite
    file's path, created if missing). Thread-safe. Timestamps are Unix seconds."""

    def __init__(self, db: SqlDb | str) -> None:
        self.db, self._owned = open_db(db)
        self._listeners: list[Listener] = []
        self.db.ddl(sqlite=_SQLITE, postgresql=_POSTGRES)

    def close(self) -> None:
        if self._owned:
            self.db.close()

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(event, alert)`` after each committed open, ack and resolve (not for updates
        of an alert already open). A listener must not block; its exceptions are logged."""
        self._listeners.append(listener)

    def raise_alert(self, key: str, kind: str, severity: str, model: str, version: str, scope: str, summary: str,
                    details: dict[str, Any] | None = None) -> tuple[Alert, bool]:  # fmt: skip
        """Open an alert, or update the unresolved one with the same ``key``; True when newly opened."""
        for name, value in (("key", key), ("kind", kind), ("model", model), ("version", version), ("scope", scope)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"alert field {name!r} must be a non-empty string")
        if severity not in SEVERITIES:
            raise ValueError(f"alert field 'severity' is {severity!r}; use one of {', '.join(SEVERITIES)}")
        encoded = json.dumps(details or {}, sort_keys=True, default=str)
        if len(encoded) > MAX_DETAILS_BYTES:
            raise ValueError(f"alert field 'details' is {len(encoded)} bytes of JSON, over {MAX_DETAILS_BYTES}; "
                             "keep only the top findings")  # fmt: skip
        now = time.time()
        with self.db.transaction() as tx:
            row = tx.execute(_RAISE, [key, kind, severity, model, version, scope, summary, encoded, now, now])[0]
            alert = _get(tx, row["id"])
        opened = int(row["count"]) == 1
        if opened:
            self._notify("opened", alert)
        return alert, opened

    def ack(self, alert_id: int | str, by: str) -> Alert:
        """Acknowledge an open alert; Conflict when it is already acknowledged or resolved."""
        with self.db.transaction() as tx:
            alert = _get(tx, alert_id, lock=True)
            if alert.state != "open":
                who = alert.acknowledged_by if alert.state == "acknowledged" else alert.resolved_by
                raise Conflict(f"alert {alert.id} is already {alert.state} (by {who}); nothing to acknowledge")
            tx.execute("UPDATE alerts SET state = 'acknowledged', acknowledged_at = ?, acknowledged_by = ? "
                       "WHERE id = ?", [time.time(), by, alert.id])  # fmt: skip
            alert = _get(tx, alert.id)
        self._notify("acknowledged", alert)
        return alert

    def resolve(self, alert_id: int | str, by: str) -> Alert:
        """Resolve an open or acknowledged alert; Conflict when it is already resolved. The next alert
        raised with its key opens a new record."""
        with self.db.transaction() as tx:
            alert = _get(tx, alert_id, lock=True)
            if alert.state == "resolved":
                raise Conflict(f"alert {alert.id} is already resolved (by {alert.resolved_by}); a new occurrence "
                               "opens a new alert")  # fmt: skip
            tx.execute("UPDATE alerts SET state = 'resolved', resolved_at = ?, resolved_by = ? WHERE id = ?",
                       [time.time(), by, alert.id])  # fmt: skip
            alert = _get(tx, alert.id)
        self._notify("resolved", alert)
        return alert

    def get(self, alert_id: int | str) -> Alert:
        """One alert; NotFound when unknown."""
        with self.db.transaction(read_only=True) as tx:
            return _get(tx, alert_id)

    def list(self, state: str | None = None) -> list[Alert]:
        """Alerts, most recently seen first; ``state``: open, acknowledged, resolved, ``active`` (open or
        acknowledged), or None / ``all``."""
        args: list[str] = []
        if state in (None, "all"):
            where = ""
        elif state == "active":
            where = "WHERE state != 'resolved'"
        elif state in STATES:
            where, args = "WHERE state = ?", [state]
        else:
            raise ValueError(f"state {state!r} is not one of open, acknowledged, resolved, active, all")
        rows = self.db.execute(f"SELECT * FROM alerts {where} ORDER BY last_seen DESC, id DESC", args)
        return [_alert(row) for row in rows]

    def counts(self) -> Counter[tuple[str, str, str]]:
        """Unresolved alerts per (kind, severity, state)."""
        rows = self.db.execute(
            "SELECT kind, severity, state, COUNT(*) AS n FROM alerts WHERE state != 'resolved' GROUP BY 1, 2, 3"
        )
        return Counter({(r["kind"], r["severity"], r["state"]): int(r["n"]) for r in rows})

    def _notify(self, event: str, alert: Alert) -> None:
        for listener in self._listeners:
            try:
                listener(event, alert)
            except Exception:
                log.exception("alert listener failed on %s of alert %d", event, alert.id)


def _get(tx: Tx, alert_id: int | str, lock: bool = False) -> Alert:
    """One alert (``lock``: its row held until the transaction ends); NotFound when unknown."""
    try:
        number = int(alert_id)
    except (TypeError, ValueError):
        number = -1
    rows = tx.execute("SELECT * FROM alerts WHERE id = ?" + (" FOR UPDATE" if lock else ""), [number])
    if not rows:
        raise NotFound(f"alert {alert_id!r} is unknown; see 'cloud-hub alerts list --state all'")
    return _alert(rows[0])


def _alert(row: Row) -> Alert:
    return Alert(**{**row, "id": int(row["id"]), "details": json.loads(row["details"])})


class AlertWebhook:
    """POSTs alert events as JSON to ``url`` from one background thread: a bounded queue (a full one
    drops the event), ``timeout_s`` per attempt, ``attempts`` tries with doubling backoff. A failure is
    logged and counted in ``failures`` by reason (``queue_full``, ``unreachable``, ``http_status``);
    nothing here ever blocks the hub.

    Payload: ``{"event": "opened" | "acknowledged" | "resolved", "alert": {...Alert fields...},
    "sent_at": unix seconds, "source": "edgefed-hub"}``.
    """

    def __init__(self, url: str, timeout_s: float = 5.0, attempts: int = 3, backoff_s: float = 1.0,
                 queue_size: int = 1000) -> None:  # fmt: skip
        if not url.startswith(("http://", "https://")):
            raise HubError(f"--alert-webhook {url!r}: use an http:// or https:// URL")
        self.url, self.timeout_s, self.attempts, self.backoff_s = url, timeout_s, max(1, attempts), backoff_s
        self.queue: queue.Queue[tuple[str, Alert] | None] = queue.Queue(maxsize=queue_size)
        self.delivered = 0
        self.failures: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgefed-alert-webhook", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        with suppress(queue.Full):
            self.queue.put_nowait(None)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def __call__(self, event: str, alert: Alert) -> None:
        """Queue an event (an AlertStore listener); never blocks."""
        try:
            self.queue.put_nowait((event, alert))
        except queue.Full:
            self.failures["queue_full"] += 1
            log.warning("alert webhook queue is full: %s of alert %d not sent to %s", event, alert.id, self.url)

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self.queue.get()
            if item is None:
                return
            self._deliver(*item)

    def _deliver(self, event: str, alert: Alert) -> None:
        body = json.dumps({"event": event, "alert": alert.to_dict(), "sent_at": time.time(),
                           "source": "edgefed-hub"}).encode()  # fmt: skip
        reason = ""
        for attempt in range(self.attempts):
            if attempt and self._stop.wait(self.backoff_s * 2 ** (attempt - 1)):
                break
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})  # fmt: skip
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    response.read()
                self.delivered += 1
                return
            except urllib.error.HTTPError as exc:
                reason, detail = "http_status", f"HTTP {exc.code}"
            except (urllib.error.URLError, OSError) as exc:
                reason, detail = "unreachable", str(getattr(exc, "reason", exc))
            log.warning("alert webhook %s: %s of alert %d, attempt %d/%d failed: %s", self.url, event, alert.id,
                        attempt + 1, self.attempts, detail)  # fmt: skip
        self.failures[reason or "stopped"] += 1
