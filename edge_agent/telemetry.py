"""Telemetry recording: every SDK call leaves a compact record in the spool without blocking the caller.

The caller appends one tuple to a deque (``record``: well under 1 µs). A writer thread drains it every
``flush_interval_s``, packs the calls of each (model, version, route) into one spool row and writes
them, with the histograms of the summarised tensors, in one transaction (``spool.py``).

What the writer may cost is bounded, because its CPU time and the GIL it holds come out of the
inference threads' share of the cores: packing costs a fraction of a µs a call, and tensors are
summarised (copied by the caller, binned by the writer) for at most ``SUMMARY_CALLS_PER_S`` calls a
second per model version: above that rate a random sample of calls is summarised, with probability
adapted after every flush, and each histogram records ``calls`` and ``summarised`` so the hub can scale
its counts. A full queue drops records, and a failed write keeps its calls' count: every drop is
counted and reported to the hub. The writer thread never dies: a spool file deleted or corrupted under
it is made again by the spool (new epoch, the gap counted as dropped), and any other failure of a flush
is logged and its calls counted as dropped.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from itertools import compress, repeat, starmap
from operator import itemgetter
from typing import cast

import numpy as np

from edge_agent.calls import OK, OVER_BUDGET, CallBlock, TensorCounts, aggregate
from edge_agent.protocol.sketch import Sketch
from edge_agent.spool import MAX_SPOOL_CALLS, SPOOL_FILE, Spool

log = logging.getLogger(__name__)
QUEUE_SIZE = 100_000
FLUSH_INTERVAL_S = 0.25
MAX_SUMMARY_BYTES = 64 * 1024  # larger inputs are not copied for summaries; outputs are not copied
SUMMARY_CALLS_PER_S = 200.0  # per (model, version, route): above this call rate a random sample is summarised
MAX_CALLS_PER_WRITE = 50_000  # one transaction's worth
_now = time.time

Key = tuple[str, str, str]  # model, version, route
Tensors = dict[str, np.ndarray]
# a call: key, time, latency ms, flags; a summarised call also its reference bins and tensors
Summarised = tuple[Key, float, float, int, Sketch, Tensors]
Item = tuple[Key, float, float, int] | Summarised
ELIGIBLE, SAMPLED = 4, 8  # queue-only flags (the spool keeps OK | OVER_BUDGET): has reference bins; summarised


@dataclass(frozen=True)
class Packed:
    """One write's worth of calls: blocks, histograms, and the calls eligible for summaries per key."""

    blocks: list[CallBlock]
    histograms: list[TensorCounts]
    eligible: dict[Key, int]


class TelemetryRecorder:
    """Non-blocking front of the spool for app processes: ``record`` is one deque append.

    Beyond ``QUEUE_SIZE`` pending records new ones are dropped and counted (never silently).
    ``summary_calls_per_s`` overrides ``SUMMARY_CALLS_PER_S``.
    """

    def __init__(
        self, spool: Spool, flush_interval_s: float | None = None, summary_calls_per_s: float | None = None
    ) -> None:
        self.spool, self.flush_interval_s = spool, flush_interval_s or FLUSH_INTERVAL_S
        self.summary_calls_per_s = summary_calls_per_s or SUMMARY_CALLS_PER_S
        self.queue_size = QUEUE_SIZE
        self._pending: deque[Item] = deque()
        self._sample_p: dict[Key, float] = {}  # chance that a call's tensors are summarised; absent: 1
        self._references: dict[Key, Sketch] = {}  # the writer's: bins of the keys summarised so far
        self._random = random.Random().random
        self._overflow = 0
        self._overflow_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._flushed_at = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="edgefed-telemetry", daemon=True)
        self._thread.start()

    def record(
        self, model: str, version: str, route: str, latency_ms: float, ok: bool,
        reference: Sketch | None = None, inputs: Tensors | None = None, outputs: Tensors | None = None,
        *, over_budget: bool = False,
    ) -> None:  # fmt: skip
        """Queue one call. ``reference`` makes it eligible for a tensor summary; ``over_budget``: a
        successful call slower than the latency budget."""
        pending = self._pending
        if len(pending) >= self.queue_size:
            self._count_lost(1)
            return
        key = (model, version, route)
        flags = ok | over_budget << 1
        if reference is None:
            pending.append((key, _now(), latency_ms, flags))
        elif self._random() >= self._sample_p.get(key, 1.0):
            pending.append((key, _now(), latency_ms, flags | ELIGIBLE))
        else:
            tensors = _to_summarise(reference, inputs, outputs)
            pending.append((key, _now(), latency_ms, flags | ELIGIBLE | SAMPLED, reference, tensors))

    @property
    def sample_rates(self) -> dict[Key, float]:
        """The current chance of summarising a call, for keys above the summary budget."""
        return dict(self._sample_p)

    def _count_lost(self, calls: int) -> None:
        with self._overflow_lock:
            self._overflow += calls

    def _take_lost(self) -> int:
        with self._overflow_lock:
            lost, self._overflow = self._overflow, 0
        return lost

    def _drain(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            self._flush_logged()
        self._flush_logged()

    def _flush_logged(self) -> None:
        try:
            self.flush()
        except Exception:  # never let the writer thread die; ``_write`` has counted what it could not write
            log.exception("telemetry: flush failed")

    def flush(self) -> None:
        """Write what was recorded until now to the spool, then adapt the summary sampling to the call rate."""
        with self._flush_lock:
            now = time.monotonic()
            elapsed, self._flushed_at = max(now - self._flushed_at, 1e-3), now
            cap = max(1, round(2 * self.summary_calls_per_s * max(elapsed, self.flush_interval_s)))
            eligible: Counter[Key] = Counter()
            remaining = len(self._pending)  # calls recorded meanwhile wait for the next flush
            while True:
                taken = list(starmap(self._pending.popleft, repeat((), min(remaining, MAX_CALLS_PER_WRITE))))
                remaining -= len(taken)
                lost = self._take_lost()
                if (taken or lost) and not self._write(taken, lost, cap, eligible):
                    break
                if remaining <= 0:
                    break
            self._adapt(eligible, elapsed)

    def _write(self, taken: list[Item], lost: int, cap: int, eligible: Counter[Key]) -> bool:
        try:
            packed = pack(taken, cap, self._references)
            self.spool.append(packed.blocks, lost, packed.histograms)
        except Exception:  # never let the writer thread die (sqlite3.Error, OSError, ...)
            log.exception("telemetry: could not write %d calls to the spool; counted as dropped", len(taken))
            self._count_lost(len(taken) + lost)
            return False
        eligible.update(packed.eligible)
        return True

    def _adapt(self, eligible: Counter[Key], elapsed: float) -> None:
        """Summarise ``summary_calls_per_s`` of each key's calls: the chance drops at once when the rate
        rises, and at most doubles a flush when it falls (a pause between bursts does not reset it)."""
        budget, rates = self.summary_calls_per_s * elapsed, {}
        for key in set(eligible) | set(self._sample_p):
            p = min(budget / eligible[key] if eligible[key] else 1.0, 2 * self._sample_p.get(key, 1.0))
            if p < 1.0:
                rates[key] = p
        self._sample_p = rates

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.spool.close()


def _to_summarise(reference: Sketch, inputs: Tensors | None, outputs: Tensors | None) -> Tensors:
    """The tensors of one call to bin: outputs (ours) as they are, inputs (the caller's) copied."""
    tensors = dict(outputs or {})
    for name, array in (inputs or {}).items():
        if name in reference.tensors and array.nbytes <= MAX_SUMMARY_BYTES:
            tensors[name] = array.copy()
    return tensors


def pack(taken: list[Item], max_summarised: int, references: dict[Key, Sketch] | None = None) -> Packed:
    """Group calls by (model, version, route) into blocks and bin the tensors of at most ``max_summarised``
    summarised calls per group (a uniform random subset: scaling by calls / summarised stays unbiased).
    ``references`` remembers each key's bins, so a write in which none of a key's calls was summarised
    still counts its calls.

    Column-wise with C-level loops that touch each call's tuple as little as possible: this runs beside
    the app's threads, and every µs it holds the GIL is a µs one of them may wait."""
    if not taken:
        return Packed([], [], {})
    references = {} if references is None else references
    n = len(taken)
    keys = list(map(itemgetter(0), taken))
    ts = np.fromiter(map(itemgetter(1), taken), np.float64, n)
    latency = np.fromiter(map(itemgetter(2), taken), np.float32, n)
    flags = np.fromiter(map(itemgetter(3), taken), np.uint8, n)
    if keys.count(keys[0]) == n:
        return _pack_group(keys[0], ts, latency, flags, taken, max_summarised, references)
    unique = list(dict.fromkeys(keys))
    index = {key: i for i, key in enumerate(unique)}
    codes = np.fromiter(map(index.__getitem__, keys), np.intp, n)
    parts = []
    for i, key in enumerate(unique):
        mask = codes == i
        items = list(compress(taken, mask.tolist()))
        parts.append(_pack_group(key, ts[mask], latency[mask], flags[mask], items, max_summarised, references))
    return Packed([b for p in parts for b in p.blocks], [h for p in parts for h in p.histograms],
                  {k: v for p in parts for k, v in p.eligible.items()})  # fmt: skip


def _pack_group(key: Key, ts: np.ndarray, latency: np.ndarray, flags: np.ndarray, items: list[Item],
                max_summarised: int, references: dict[Key, Sketch]) -> Packed:  # fmt: skip
    block = CallBlock(*key, ts, latency, flags & (OK | OVER_BUDGET))
    eligible = int(np.count_nonzero(flags & ELIGIBLE))
    if not eligible:
        return Packed([block], [], {})
    sampled = [cast(Summarised, items[i]) for i in np.flatnonzero(flags & SAMPLED).tolist()]
    if len(sampled) > max_summarised:
        sampled = random.sample(sampled, max_summarised)
    if sampled:
        references[key] = sampled[-1][4]
    reference = references.get(key)  # none: no call of this key was ever summarised (the first one is)
    histograms = _histograms(key, reference, [item[5] for item in sampled], eligible) if reference else []
    return Packed([block], histograms, {key: eligible})


def _histograms(key: Key, reference: Sketch, summarised: list[Tensors], calls: int) -> list[TensorCounts]:
    """Counts per reference feature; a tensor no call of this write summarised still counts the calls
    (zero counts, ``summarised`` 0), so ``calls`` stays the period's total. Tensors that are not
    numbers (strings) have no features and are left out."""
    result = []
    for name in reference.tensors:
        parts = [tensors[name] for tensors in summarised if name in tensors]
        try:
            counted, used = _count(reference, name, parts)
        except Exception:  # one tensor never costs the write its calls, nor other models theirs
            log.exception("telemetry: could not bin %s of %s@%s; its calls count as not summarised", name, *key[:2])
            counted, used = {}, 0
        for feature in reference.features_of(name):
            counts = counted.get(feature.name) if used else np.zeros(len(feature.counts), np.int64)
            if counts is not None:
                result.append(TensorCounts(key[0], key[1], feature.name, feature.edges, counts, calls, used))
    return result


def _count(reference: Sketch, name: str, parts: list[np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """Feature counts of the calls' ``parts`` of one tensor, and how many parts they count (a part whose
    samples do not fit the reference, such as a sequence of another length, is left out): one batch when
    their shapes agree, else call by call."""
    if not parts:
        return {}, 0
    try:
        batch = np.concatenate(parts)
    except ValueError:
        total: dict[str, np.ndarray] = {}
        used = 0
        for part in parts:
            counted = reference.count({name: part})
            used += bool(counted)
            for feature, counts in counted.items():
                total[feature] = total[feature] + counts if feature in total else counts
        return total, used
    counted = reference.count({name: batch})
    return counted, len(parts) if counted else 0


__all__ = [
    "ELIGIBLE", "MAX_SPOOL_CALLS", "OK", "OVER_BUDGET", "SAMPLED", "SPOOL_FILE", "CallBlock", "Item", "Packed", "Spool",
    "TelemetryRecorder", "TensorCounts", "aggregate", "pack",
]  # fmt: skip
