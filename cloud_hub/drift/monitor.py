"""The hub's drift job: telemetry histograms → windows per (model, version, scope) → the sequential
detector → alerts.

Every ``interval_s`` it reads the telemetry batches stored since its cursor, adds each batch's feature
counts (the sampled calls' counts; they are a uniform sample, so the test needs no scaling) to the open
window of the model version for every scope the device is in (``all``, ``group:G`` for each of its
groups, ``tag:K=V`` for each of its tags), and when a window holds ``window_calls`` samples closes it:
the detector scores it, and an alarm raises (or refreshes) the alert ``drift:MODEL@VERSION:SCOPE``
naming the drifting features, after which that stream's detector starts again. Counts are compared with
the artifact's ``reference.json``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cloud_hub.alerts import AlertStore
from cloud_hub.artifacts import Artifacts
from cloud_hub.drift.operations import OperationsBaseline, window_counts
from cloud_hub.drift.scores import g_test, js_distance, psi
from cloud_hub.drift.sequential import SequentialDetector, WindowResult
from cloud_hub.drift.store import ClosedWindow, DriftStore, SavedStream, StreamKey
from cloud_hub.periodic import Periodic
from cloud_hub.registry import Registry
from cloud_hub.sqldb import SqlDb
from edge_agent.protocol.sketch import Sketch

log = logging.getLogger(__name__)


OPERATIONS = "operations/"  # the scope prefix of operations streams (errors, routes, latency, budget)


@dataclass
class Stream:
    """One (model, version, scope): its detector and the window it is filling. An operations stream has
    a ``baseline`` instead of a reference, and no detector until the baseline is complete."""

    key: StreamKey
    detector: SequentialDetector | None
    baseline: OperationsBaseline | None = None
    pending: dict[str, np.ndarray] = field(default_factory=dict)
    samples: int = 0
    last_scores: dict[str, float] = field(default_factory=dict)  # of the last closed window (before a reset)

    def add(self, counts: dict[str, np.ndarray], samples: int) -> None:
        for name, values in counts.items():
            self.pending[name] = self.pending[name] + values if name in self.pending else values.copy()
        self.samples += samples

    def saved(self) -> SavedStream:
        pending = {name: values.tolist() for name, values in self.pending.items()}
        state = self.baseline.state() if self.baseline is not None else self.detector.state() if self.detector else {}
        return SavedStream(self.key, state, pending, self.samples)


def device_scopes(device: dict[str, Any]) -> list[str]:
    """The scopes a device's counts go to: ``all``, ``group:G`` per group, ``tag:K=V`` per tag."""
    tags = device.get("tags") or {}
    return ["all", *(f"group:{g}" for g in device.get("groups") or []), *(f"tag:{k}={v}" for k, v in tags.items())]


class DriftMonitor:
    def __init__(self, registry: Registry, artifacts: Artifacts, alerts: AlertStore, db_path: SqlDb | str, *,
                 window_calls: int = 200, false_alarms_per_100k: float = 1.0,
                 interval_s: float = 10.0) -> None:  # fmt: skip
        self.registry, self.artifacts, self.alerts = registry, artifacts, alerts
        self.store = DriftStore(db_path)
        self.window_calls, self.false_alarms_per_100k, self.interval_s = window_calls, false_alarms_per_100k, interval_s
        self._sketches: dict[tuple[str, str], Sketch | None] = {}
        self._registered: set[tuple[str, str]] = set()
        self._streams: dict[StreamKey, Stream] = {}
        self._lock = threading.Lock()
        self._job = Periodic("drift job", interval_s, self._run_all)
        for saved in self.store.streams():
            self._restore(saved)

    def only_while(self, active: Callable[[], bool]) -> None:
        """Run the periodic job only while ``active()`` (the replica that leads, cloud_hub/leader.py)."""
        self._job.active = active

    def reload(self) -> None:
        """The detectors again from the saved state: another replica led (and moved them on) meanwhile."""
        with self._lock:
            self._streams = {}
            for saved in self.store.streams():
                self._restore(saved)

    def start(self) -> None:
        self._job.start()

    def stop(self) -> None:
        self._job.stop()
        self.store.close()

    def _run_all(self) -> None:
        while self.run_once():
            pass

    def run_once(self, limit: int = 500) -> int:
        """Process up to ``limit`` new telemetry batches; the number processed."""
        with self._lock:
            rows = self.registry.telemetry_after(self.store.cursor(), limit)
            if not rows:
                return 0
            scopes = {d["device_id"]: device_scopes(d) for d in self.registry.devices()}
            changed: dict[StreamKey, Stream] = {}
            closed: list[ClosedWindow] = []
            try:
                for row in rows:
                    try:
                        closed += self._row(row, scopes.get(row["device_id"], ["all"]), changed)
                    except (ValueError, OverflowError, KeyError, TypeError) as exc:  # one bad batch, not the job
                        log.warning("drift job skips batch %s of %s: %s", row.get("seq"), row.get("device_id"), exc)
                self.store.save(rows[-1]["cursor"], [s.saved() for s in changed.values()], closed)
            except Exception:  # the run is repeated from the saved state, so nothing is counted twice
                self._streams = {}
                for saved in self.store.streams():
                    self._restore(saved)
                raise
            return len(rows)

    def _row(self, row: dict[str, Any], scopes: list[str], changed: dict[StreamKey, Stream]) -> list[ClosedWindow]:
        """One telemetry batch into its streams: feature counts, then the operations windows."""
        closed = []
        for (model, version), counts in self._batch_counts(row["histograms"]).items():
            samples = max(int(c.sum()) for c in counts.values())
            for scope in scopes:
                stream = self._stream((model, version, scope))
                if stream is None:
                    continue
                stream.add(counts, samples)
                changed[stream.key] = stream
                if stream.samples >= self.window_calls:
                    closed.append(self._close(stream))
        return closed + self._operations(row, scopes, changed)

    def _operations(
        self, row: dict[str, Any], scopes: list[str], changed: dict[StreamKey, Stream]
    ) -> list[ClosedWindow]:
        """Feed a batch's windows (errors, routes, budget, latency) to the operations streams."""
        closed = []
        for (model, version), counts in window_counts(row["windows"]).items():
            if not self._known(model, version):  # a name a device made up gets no stream, no row
                continue
            calls = int(counts["ops/errors"].sum())
            for scope in scopes:
                key = (model, version, OPERATIONS + scope)
                stream = self._streams.setdefault(key, Stream(key, None, OperationsBaseline()))
                changed[key] = stream
                assert stream.baseline is not None
                if stream.detector is None:
                    if stream.baseline.add(counts, calls, self.false_alarms_per_100k, self.window_calls):
                        stream.detector = stream.baseline.detector
                    continue
                stream.add({n: v for n, v in counts.items() if n in stream.detector.reference}, calls)
                if stream.samples >= self.window_calls:
                    closed.append(self._close(stream))
        return closed

    def _known(self, model: str, version: str) -> bool:
        """Whether the registry has that model version (a yes is remembered; a no is asked again, since
        the version may be added later)."""
        if (model, version) not in self._registered and self.registry.artifacts(model, version):
            self._registered.add((model, version))
        return (model, version) in self._registered

    def _batch_counts(self, histograms: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, np.ndarray]]:
        """Feature counts per model version of one batch: those the version's reference knows, with the
        reference's number of bins, from calls that were summarised."""
        found: dict[tuple[str, str], dict[str, np.ndarray]] = defaultdict(dict)
        for h in histograms:
            sketch = self._sketch(h["model"], h["version"])
            feature = sketch.feature(h["tensor"]) if sketch is not None else None
            if feature is None or len(h["counts"]) != len(feature.counts) or not sum(h["counts"]):
                continue
            found[(h["model"], h["version"])][h["tensor"]] = np.asarray(h["counts"], np.int64)
        return found

    def _sketch(self, model: str, version: str) -> Sketch | None:
        if (model, version) not in self._sketches:
            rows = self.registry.artifacts(model, version)
            if not rows:  # not registered (yet): asked again next time, never remembered as missing
                return None
            sketch = Sketch.load(self.artifacts.path(rows[0]["artifact_id"]))
            if sketch is None:
                log.info("%s@%s has no reference.json: no drift detection for it", model, version)
            self._sketches[(model, version)] = sketch
        return self._sketches[(model, version)]

    def _detector(self, sketch: Sketch) -> SequentialDetector:
        reference = {f.name: f.counts for f in sketch.features}
        return SequentialDetector(reference, false_alarms_per_100k=self.false_alarms_per_100k,
                                  window_calls=self.window_calls)  # fmt: skip

    def _stream(self, key: StreamKey) -> Stream | None:
        if key not in self._streams:
            sketch = self._sketch(key[0], key[1])
            if sketch is None:
                return None
            self._streams[key] = Stream(key, self._detector(sketch))
        return self._streams[key]

    def _restore(self, saved: SavedStream) -> None:
        pending = {name: np.asarray(values, np.int64) for name, values in saved.pending.items()}
        if saved.key[2].startswith(OPERATIONS):
            try:
                baseline = OperationsBaseline.from_state(saved.detector)
            except (ValueError, KeyError, TypeError) as exc:  # unusable: that stream starts a new baseline
                log.warning("operations state of %s is unusable (%s): starting it again", "/".join(saved.key), exc)
                return
            self._streams[saved.key] = Stream(saved.key, baseline.detector, baseline, pending, saved.samples)
            return
        sketch = self._sketch(saved.key[0], saved.key[1])
        if sketch is None:
            return
        reference = {f.name: f.counts for f in sketch.features}
        try:
            detector = SequentialDetector.from_state(reference, saved.detector)
        except (ValueError, KeyError) as exc:
            log.warning("drift state of %s is unusable (%s): starting it again", "/".join(saved.key), exc)
            detector = self._detector(sketch)
        self._streams[saved.key] = Stream(saved.key, detector, None, pending, saved.samples)

    def _close(self, stream: Stream) -> ClosedWindow:
        assert stream.detector is not None
        result = stream.detector.update(stream.pending)
        window = ClosedWindow(stream.key, time.time(), stream.samples, result.combined, result.threshold,
                              result.alarm, list(result.drifting), self._feature_scores(stream, result))  # fmt: skip
        stream.last_scores = {name: scored["score"] for name, scored in window.features.items()}
        if result.alarm:
            self._alert(stream.key, result)
            stream.detector.reset()
        stream.pending, stream.samples = {}, 0
        return window

    def _feature_scores(self, stream: Stream, result: WindowResult) -> dict[str, dict[str, Any]]:
        return {name: {"score": round(score.cusum / result.threshold, 4) if result.threshold else 0.0,
                       "psi": round(score.psi, 5), "js": round(score.js, 5), "p_value": score.p_value,
                       "counts": stream.pending[name].tolist()}
                for name, score in result.scores.items()}  # fmt: skip

    def _alert(self, key: StreamKey, result: WindowResult) -> None:
        model, version, scope = key
        kind = "operations" if scope.startswith(OPERATIONS) else "drift"
        scope = scope.removeprefix(OPERATIONS)
        worst = list(result.drifting[:5])
        summary = f"{kind} drift in {model}@{version} ({scope}): {', '.join(worst)}"
        scores = {name: result.scores[name].to_dict() for name in worst if name in result.scores}
        details = {"drifting": list(result.drifting[:20]), "combined": result.combined,
                   "threshold": result.threshold, "scores": scores}  # fmt: skip
        self.alerts.raise_alert(f"{kind}:{model}@{version}:{scope}", kind, "warning", model, version, scope,
                                summary, details)  # fmt: skip

    def scores(self) -> list[tuple[str, str, str, str, float]]:
        """(model, version, scope, feature, score) of each stream's last closed window: the feature's
        largest CUSUM over the alarm threshold (1 or more: alarming)."""
        with self._lock:
            return [(*key, name, score) for key, stream in self._streams.items()
                    for name, score in stream.last_scores.items()]  # fmt: skip

    def _references(self, model: str, version: str, scope: str) -> list[tuple[str, list[float], np.ndarray]]:
        """(feature, bin edges, reference counts): the artifact's, or an operations stream's baseline (bins
        numbered, the latency ones on LATENCY_EDGES_MS)."""
        if not scope.startswith(OPERATIONS):
            sketch = self._sketch(model, version)
            return [(f.name, f.edges.tolist(), f.counts) for f in sketch.features] if sketch is not None else []
        stream = self._streams.get((model, version, scope))
        baseline = stream.baseline.counts if stream is not None and stream.baseline is not None else {}
        return [(name, [float(i) for i in range(len(counts) + 1)], counts) for name, counts in baseline.items()]

    def report(self, model: str, version: str | None, scope: str = "all", since: float = 0.0) -> dict[str, Any]:
        """Features by drift score (latest window) with reference and live (merged since ``since``) counts,
        and the combined score over time."""
        version = version or next(iter(self.store.versions(model)), None)
        if version is None:
            return {"model": model, "version": None, "scope": scope, "windows": [], "features": []}
        windows = self.store.windows(model, version, scope, since)
        live: dict[str, np.ndarray] = {}
        for window in windows:
            for name, scored in window.features.items():
                counts = np.asarray(scored["counts"], np.int64)
                live[name] = live[name] + counts if name in live else counts
        latest = windows[-1].features if windows else {}
        features = []
        for name, edges, reference in self._references(model, version, scope):
            seen = live.get(name)
            row: dict[str, Any] = {"name": name, "score": latest.get(name, {}).get("score", 0.0), "edges": edges,
                                   "reference": reference.tolist(),
                                   "live": None if seen is None else seen.tolist()}  # fmt: skip
            if seen is not None and seen.sum():
                row.update(psi=psi(reference, seen), js=js_distance(reference, seen),
                           p_value=g_test(reference, seen).p_value)  # fmt: skip
            features.append(row)
        features.sort(key=lambda r: -r["score"])
        history = [{"at": w.at, "samples": w.samples, "combined": w.combined, "threshold": w.threshold,
                    "alarm": w.alarm, "scores": {n: f["score"] for n, f in w.features.items()}}
                   for w in windows]  # fmt: skip
        return {"model": model, "version": version, "scope": scope, "windows": history, "features": features}
