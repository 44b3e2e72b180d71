"""The hub's Prometheus metrics (``GET /metrics`` on the admin port), read from the registry's database
(``Registry.sql_db()``: SQLite or PostgreSQL) at scrape time by one custom collector. The registry stores
each telemetry batch once per (device, epoch, seq); the collector reads each stored batch once (by its
arrival order, SQLite's rowid or PostgreSQL's ``cursor``, only those stored since the last scrape, so a
scrape costs what arrived since the one before), so nothing is counted twice, and a restarted hub
re-reads them all and exports the same totals. On PostgreSQL each replica exports the fleet's totals
(every replica reads the one telemetry table).

Label cardinality is bounded: model/version/route series are capped at ``MAX_MODEL_SERIES`` (the most
recently active kept), per-device series at ``MAX_DEVICE_SERIES``, drift series at
``MAX_DRIFT_SERIES`` (the highest scores kept), alert series by kind, severity and state; what a cap
leaves out is counted in ``edgefed_hub_metric_series_omitted``. Every name and label is listed in
docs/operations.md.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from cloud_hub.sqldb import SqlDb, Tx
from edge_agent.protocol.messages import LATENCY_EDGES_MS

LATENCY_PERIOD_S = 300.0  # the recent period whose windows give the latency percentiles
QUANTILES = (0.5, 0.9, 0.99)
MAX_MODEL_SERIES = 500  # (model, version, route) label sets
MAX_DEVICE_SERIES = 10_000
MAX_DRIFT_SERIES = 1_000
_BINS = len(LATENCY_EDGES_MS) + 1
_SUMS = ("calls", "errors", "breaches", "ms", "newest", *(f"h{i}" for i in range(_BINS)))
# per dialect: a window's text field, a window's number field, a latency bin, the windows of a batch, the
# column that orders batches by arrival
_DIALECTS = {
    "sqlite": ("json_extract(w.value, '$.{0}')", "json_extract(w.value, '$.{0}')",
               "json_extract(w.value, '$.latency_hist[{0}]')", "json_each(t.windows) w", "rowid"),
    "postgresql": ("(w ->> '{0}')", "(w ->> '{0}')::float8", "(w -> 'latency_hist' ->> {0})::float8",
                   "jsonb_array_elements(t.windows) w", "cursor"),
}  # fmt: skip


def _windows_sql(kind: str) -> tuple[str, str]:
    """The per-(model, version, route) sums of windows (``{where}`` to fill) and the arrival column."""
    text, number, hist_bin, windows, arrival = _DIALECTS[kind]
    hist = ", ".join(f"SUM(COALESCE({hist_bin.format(i)}, 0)) AS h{i}" for i in range(_BINS))
    return (f"SELECT {text.format('model')} AS model, {text.format('version')} AS version, "
            f"{text.format('route')} AS route, SUM({number.format('count')}) AS calls, "
            f"SUM({number.format('errors')}) AS errors, SUM(COALESCE({number.format('budget_breaches')}, 0)) AS "
            f"breaches, SUM({number.format('latency_ms_sum')}) AS ms, MAX(t.{arrival}) AS newest, {hist} "
            f"FROM telemetry t, {windows} WHERE {{where}} GROUP BY 1, 2, 3", arrival)  # fmt: skip


DriftScores = Callable[[], Sequence[tuple[str, str, str, str, float]]]


def quantile_ms(hist: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of calls counted on LATENCY_EDGES_MS (plus one overflow bin), linear
    within a bin (the first starts at 0); NaN without calls; the top edge when it falls in the overflow."""
    total = sum(hist)
    if total <= 0:
        return math.nan
    rank, seen = q * total, 0.0
    for i, count in enumerate(hist):
        if count and seen + count >= rank:
            if i >= len(LATENCY_EDGES_MS):
                return LATENCY_EDGES_MS[-1]
            low = LATENCY_EDGES_MS[i - 1] if i else 0.0
            return low + (LATENCY_EDGES_MS[i] - low) * max(rank - seen, 0.0) / count
        seen += count
    return LATENCY_EDGES_MS[-1]


class HubCollector(Collector):
    """Reads the registry's database (``db``: ``Registry.sql_db()``; one read-only transaction per
    scrape), the alert store, the webhook's counters and the drift provider."""

    def __init__(self, db: SqlDb, alert_counts: Callable[[], Any], webhook: Any | None,
                 drift_scores: DriftScores, before_scrape: Callable[[], None] = lambda: None) -> None:  # fmt: skip
        self.db, self.alert_counts, self.webhook = db, alert_counts, webhook
        self._windows, self._arrival = _windows_sql(db.kind)
        self.drift_scores, self.before_scrape = drift_scores, before_scrape
        self._lock = threading.Lock()  # one scrape reads and adds at a time
        self._read_up_to = 0  # telemetry's arrival order (SQLite: rowid, PostgreSQL: cursor)
        self._totals: dict[tuple[str, str, str], list[float]] = {}  # count, errors, breaches, ms, newest, *hist
        self._dropped: dict[str, list[int]] = {}  # device → [dropped, newest rowid]

    def collect(self) -> Iterator[Metric]:
        self.before_scrape()
        omitted = GaugeMetricFamily("edgefed_hub_metric_series_omitted",
                                    "Label sets left out by a cardinality cap", labels=["metric"])  # fmt: skip
        with self._lock, self.db.transaction(read_only=True) as db:  # one snapshot
            self._read_new(db)
            families = [*self._devices(db, omitted), *self._calls(db, omitted)]
        yield from families
        yield from self._alerts()
        yield from self._drift(omitted)
        yield omitted

    def _read_new(self, db: Tx) -> None:
        """Add the batches stored since the last scrape (their order only grows: the registry only inserts)."""
        arrival = self._arrival
        newest = int(db.execute(f"SELECT COALESCE(MAX({arrival}), 0) AS newest FROM telemetry")[0]["newest"])
        if newest <= self._read_up_to:
            return
        span = [self._read_up_to, newest]
        for row in db.execute(self._windows.format(where=f"t.{arrival} > ? AND t.{arrival} <= ?"), span):
            total = self._totals.setdefault((str(row["model"]), str(row["version"]), str(row["route"])),
                                            [0.0] * len(_SUMS))  # fmt: skip
            for i, name in enumerate(_SUMS):
                add = float(row[name] or 0)
                total[i] = max(total[i], add) if name == "newest" else total[i] + add
        for row in db.execute(f"SELECT device_id, SUM(dropped) AS dropped, MAX({arrival}) AS last FROM telemetry "
                              f"WHERE {arrival} > ? AND {arrival} <= ? GROUP BY 1", span):  # fmt: skip
            seen = self._dropped.setdefault(row["device_id"], [0, 0])
            seen[0], seen[1] = seen[0] + int(row["dropped"] or 0), int(row["last"])
        self._read_up_to = newest

    def _devices(self, db: Tx, omitted: GaugeMetricFamily) -> Iterator[Metric]:
        rows = db.execute("SELECT COALESCE(status, '') AS status, COUNT(*) AS n FROM devices GROUP BY 1")
        statuses = {r["status"]: int(r["n"]) for r in rows}
        yield GaugeMetricFamily("edgefed_hub_devices_known", "Devices in the registry", value=sum(statuses.values()))
        yield GaugeMetricFamily("edgefed_hub_devices_online", "Devices whose last status was online",
                                value=statuses.get("online", 0))  # fmt: skip
        dropped = CounterMetricFamily("edgefed_hub_spool_dropped", "Calls a device's spool dropped (reported)",
                                      labels=["device"])  # fmt: skip
        recent = sorted(self._dropped.items(), key=lambda item: -item[1][1])  # the most recently heard first
        for device, (count, _) in recent[:MAX_DEVICE_SERIES]:
            dropped.add_metric([device], count)
        omitted.add_metric(["edgefed_hub_spool_dropped"], max(len(recent) - MAX_DEVICE_SERIES, 0))
        yield dropped
        cloud = CounterMetricFamily("edgefed_hub_cloud_calls", "Cloud inference calls per device",
                                    labels=["device"])  # fmt: skip
        usage = db.execute("SELECT device_id, SUM(calls) AS calls FROM cloud_usage GROUP BY 1 ORDER BY 2 DESC")
        for row in usage[:MAX_DEVICE_SERIES]:
            cloud.add_metric([row["device_id"]], float(row["calls"] or 0))
        omitted.add_metric(["edgefed_hub_cloud_calls"], max(len(usage) - MAX_DEVICE_SERIES, 0))
        yield cloud

    def _calls(self, db: Tx, omitted: GaugeMetricFamily) -> Iterator[Metric]:
        labels = ["model", "version", "route"]
        calls = CounterMetricFamily("edgefed_hub_calls", "Calls reported by devices", labels=labels)
        errors = CounterMetricFamily("edgefed_hub_call_errors", "Calls that failed", labels=labels)
        breaches = CounterMetricFamily("edgefed_hub_budget_breaches", "Local calls over the latency budget",
                                       labels=labels)  # fmt: skip
        latency = HistogramMetricFamily("edgefed_hub_call_latency_ms", "Call latency (ms)", labels=labels)
        rows = sorted(self._totals.items(), key=lambda item: -item[1][4])  # the most recently active first
        for key, (count, failed, over, total_ms, _, *hist) in rows[:MAX_MODEL_SERIES]:
            calls.add_metric(list(key), count)
            errors.add_metric(list(key), failed)
            breaches.add_metric(list(key), over)
            cumulative, buckets = 0.0, []
            for edge, n in zip([*map(str, LATENCY_EDGES_MS), "+Inf"], hist, strict=True):
                cumulative += n
                buckets.append((edge, cumulative))
            latency.add_metric(list(key), buckets, total_ms)
        omitted.add_metric(["edgefed_hub_calls"], max(len(rows) - MAX_MODEL_SERIES, 0))
        yield from (calls, errors, breaches, latency)
        recent = GaugeMetricFamily("edgefed_hub_call_latency_recent_ms",
                                   f"Latency percentiles over the last {LATENCY_PERIOD_S:g} s of windows received "
                                   "(estimated from their histograms)", labels=[*labels, "quantile"])  # fmt: skip
        since = [time.time() - LATENCY_PERIOD_S]
        for row in db.execute(self._windows.format(where="t.received >= ?"), since)[:MAX_MODEL_SERIES]:
            hist = [float(row[f"h{i}"] or 0) for i in range(_BINS)]
            for q in QUANTILES:
                value = quantile_ms(hist, q)
                if not math.isnan(value):
                    recent.add_metric([str(row["model"]), str(row["version"]), str(row["route"]), f"{q:g}"], value)
        yield recent

    def _alerts(self) -> Iterator[Metric]:
        alerts = GaugeMetricFamily("edgefed_hub_alerts", "Unresolved alerts", labels=["kind", "severity", "state"])
        for (kind, severity, state), count in sorted(self.alert_counts().items()):
            alerts.add_metric([kind, severity, state], count)
        yield alerts
        failures = CounterMetricFamily("edgefed_hub_alert_webhook_failures",
                                       "Alert events the webhook could not deliver", labels=["reason"])  # fmt: skip
        delivered = CounterMetricFamily("edgefed_hub_alert_webhook_deliveries", "Alert events delivered")
        if self.webhook is not None:
            for reason in ("queue_full", "unreachable", "http_status"):
                failures.add_metric([reason], self.webhook.failures.get(reason, 0))
            delivered.add_metric([], self.webhook.delivered)
        yield failures
        yield delivered

    def _drift(self, omitted: GaugeMetricFamily) -> Iterator[Metric]:
        drift = GaugeMetricFamily("edgefed_hub_drift_score", "Drift score per model version, scope and feature",
                                  labels=["model", "version", "scope", "feature"])  # fmt: skip
        scores = sorted(self.drift_scores(), key=lambda s: -s[4])
        for model, version, scope, feature, score in scores[:MAX_DRIFT_SERIES]:
            drift.add_metric([model, version, scope, feature], score)
        omitted.add_metric(["edgefed_hub_drift_score"], max(len(scores) - MAX_DRIFT_SERIES, 0))
        yield drift


def metrics_registry(collector: HubCollector) -> CollectorRegistry:
    """A registry of its own (several hubs may run in one process): the hub's collector and the
    process's CPU and memory (``process_*``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The scrape's body and content type, in the format the ``Accept`` header asks for."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
