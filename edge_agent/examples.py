"""Opt-in hard examples: samples an app marks (``EdgeClient.keep_example``) or that a low-confidence
policy picks are kept in their own capped spool (``example_spool.py``) for the agent to upload to the
hub for retraining. Nothing is kept unless the app passes ``EdgeClient(hard_examples=HardExamples())``.

The caller's cost is a copy of the arrays and one deque append: serialising (``.npz``), the spool write
and its caps run on one writer thread per client. The low-confidence policy copies a call's inputs and
outputs when together they are at most ``SMALL_CALL_BYTES`` and lets the writer score them (all the
calls waiting, in one vectorised pass); for a bigger call it scores the first output on the caller's
thread (≈ 8 µs, small beside such a model's run) and copies only the rows below the threshold.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edge_agent.errors import ConfigError
from edge_agent.example_spool import ExampleSpool
from edge_agent.protocol.errors import MessageError
from edge_agent.protocol.golden import storable
from edge_agent.protocol.messages import MAX_EXAMPLE_BYTES, MAX_EXAMPLE_REASON_CHARS, ExampleHeader, HardExample
from edge_agent.routing import Confidence, RateBudget, _probabilities

log = logging.getLogger(__name__)
SMALL_CALL_BYTES = 16 * 1024
CHECK_QUEUE = 256  # small calls waiting to be scored (at most 4 MiB); past it a call goes unchecked, counted
HEADER_ROOM = 1024  # the frame's header beside the npz, at most
Arrays = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class HardExamples:
    """The opt-in. ``max_examples`` / ``max_bytes``: the device spool's caps (the oldest examples go first,
    counted); ``max_example_bytes``: one example's arrays, at most the wire limit (bigger ones are refused
    and counted); ``low_confidence_below``: keep a local call whose first output (a classifier's) scores
    below it by ``confidence_measure`` (None: only what the app marks), at most
    ``low_confidence_per_minute`` of them; ``queue_size``: examples waiting for the writer thread."""

    max_examples: int = 1000
    max_bytes: int = 64 * 1024 * 1024
    max_example_bytes: int = MAX_EXAMPLE_BYTES - HEADER_ROOM
    low_confidence_below: float | None = None
    confidence_measure: Confidence = "max_softmax"
    low_confidence_per_minute: float = 60.0
    queue_size: int = 64

    def __post_init__(self) -> None:
        for name in ("max_examples", "max_bytes", "max_example_bytes", "queue_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"HardExamples.{name}: must be positive, got {getattr(self, name)!r}")
        if self.max_example_bytes > MAX_EXAMPLE_BYTES - HEADER_ROOM:
            raise ConfigError(f"HardExamples.max_example_bytes: at most {MAX_EXAMPLE_BYTES - HEADER_ROOM} (one "
                              "MQTT message, less its header); downsample or crop bigger samples before keeping "
                              "them")  # fmt: skip
        threshold = self.low_confidence_below
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise ConfigError(f"HardExamples.low_confidence_below: {threshold!r} is not in (0, 1]; use e.g. 0.6")
        if self.confidence_measure not in ("max_softmax", "margin", "entropy"):
            raise ConfigError(f"HardExamples.confidence_measure: {self.confidence_measure!r} is not one of "
                              "max_softmax, margin, entropy")  # fmt: skip
        if self.low_confidence_per_minute <= 0:
            raise ConfigError("HardExamples.low_confidence_per_minute: must be positive")


def row_confidence(output: np.ndarray, measure: Confidence) -> np.ndarray:
    """Each row's confidence in [0, 1] (the measures of ``routing.confidence``, per row)."""
    p = _probabilities(output)
    scores: np.ndarray
    if measure == "max_softmax":
        scores = p.max(axis=1)
    elif measure == "margin":
        top2 = np.sort(p, axis=1)[:, -2:]
        scores = top2[:, 1] - top2[:, 0]
    else:
        scores = 1.0 + (p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=1) / np.log(max(p.shape[1], 2))
    return scores


def to_npz(inputs: Arrays, outputs: Arrays | None) -> bytes:
    """The arrays as an (uncompressed) .npz: ``input/NAME`` and ``output/NAME``; text (a BYTES tensor's
    str/bytes objects) as unicode arrays. ValueError for an array that is neither numbers nor text."""
    arrays = {f"input/{k}": storable(np.asarray(v)) for k, v in inputs.items()}
    arrays.update({f"output/{k}": storable(np.asarray(v)) for k, v in (outputs or {}).items()})
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    return buffer.getvalue()


def _copies(arrays: Arrays) -> dict[str, np.ndarray]:
    return {k: np.array(v, copy=True) for k, v in arrays.items()}


def _rows(arrays: Arrays, rows: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    return {k: (np.array(v[rows]) if v.ndim and v.shape[0] == batch else np.array(v, copy=True))
            for k, v in arrays.items()}  # fmt: skip


@dataclass(frozen=True)
class _Keep:
    example_id: str
    model: str
    version: str
    reason: str
    at: float
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray] | None


@dataclass(slots=True)  # not frozen: built on the caller's path, where a frozen one costs ≈ 0.5 µs more
class _Check:
    """A small call the writer scores (the low-confidence policy)."""

    model: str
    version: str
    at: float
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


class ExampleKeeper:
    """The SDK's front of the example spool: ``keep`` and ``observe`` copy and enqueue; one writer
    thread writes. Counters (``status``) are shared by every process using the state directory."""

    def __init__(self, spool: ExampleSpool, config: HardExamples, device_id: str) -> None:
        self.spool, self.config, self.device_id = spool, config, device_id
        self.threshold = config.low_confidence_below
        self._queue: deque[_Keep] = deque()
        self._checks: deque[_Check] = deque()
        self._counts: Counter[str] = Counter()  # the callers' counts, written by the writer thread
        self._counts_lock = threading.Lock()
        self._budget = RateBudget(config.low_confidence_per_minute)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._enqueued = self._finished = 0  # items put / items the writer is done with (counts written)
        self._done = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="edgefed-examples", daemon=True)
        self._thread.start()

    # the caller's side --------------------------------------------------------------------------------
    def keep(self, model: str, version: str, inputs: Arrays, outputs: Arrays | None, reason: str) -> str | None:
        """Copy and enqueue; the example's id, or None when refused (too large, queue full: counted)."""
        size = sum(np.asarray(v).nbytes for v in inputs.values())
        size += sum(np.asarray(v).nbytes for v in (outputs or {}).values())
        if size > self.config.max_example_bytes:
            self._note("refused_too_large")
            log.warning("hard example of %s refused: its arrays are %d bytes, over the limit of %d "
                        "(HardExamples.max_example_bytes); crop or downsample it", model, size,
                        self.config.max_example_bytes)  # fmt: skip
            return None
        example_id = uuid.uuid4().hex
        item = _Keep(example_id, model, version, reason[:MAX_EXAMPLE_REASON_CHARS], time.time(), _copies(inputs),
                     _copies(outputs) if outputs is not None else None)  # fmt: skip
        return example_id if self._put(item) else None

    def observe(self, model: str, version: str, inputs: Arrays, outputs: Arrays) -> None:
        """The low-confidence policy, on a local call's result."""
        first = next(iter(outputs.values()), None)
        if first is None or first.ndim != 2 or first.dtype.kind != "f" or first.shape[1] < 2:
            return  # not a classifier's output
        size = first.nbytes + sum(v.nbytes for v in inputs.values())
        if size > SMALL_CALL_BYTES:
            scores = row_confidence(first, self.config.confidence_measure)
            item = self._low_rows(model, version, time.time(), inputs, outputs, scores)
            if item is not None:
                self._put(item)
            return
        waiting = len(self._checks)
        if waiting >= CHECK_QUEUE:
            self._note("unchecked")
            return
        with self._done:
            self._enqueued += 1
        self._checks.append(_Check(model, version, time.time(), _copies(inputs), _copies(outputs)))
        if waiting == CHECK_QUEUE // 4:
            self._wake.set()

    def _put(self, item: _Keep) -> bool:
        if len(self._queue) >= self.config.queue_size:
            self._note("dropped_queue")
            return False
        with self._done:
            self._enqueued += 1
        self._queue.append(item)
        self._wake.set()
        return True

    def _note(self, counter: str, value: int = 1) -> None:
        with self._counts_lock:
            self._counts[counter] += value

    def _low_rows(self, model: str, version: str, at: float, inputs: Arrays, outputs: Arrays,
                  scores: np.ndarray) -> _Keep | None:  # fmt: skip
        """The rows of a call that score below the threshold (the whole call when its arrays do not
        share the batch axis), within the policy's rate; None when there are none to keep."""
        assert self.threshold is not None
        low = np.flatnonzero(scores < self.threshold)
        if not len(low):
            return None
        if not self._budget.take():
            self._note("rate_limited")
            return None
        batch = len(scores)
        reason = (f"low confidence: {self.config.confidence_measure} {float(scores[low].min()):.3f} "
                  f"< {self.threshold:g}")  # fmt: skip
        return _Keep(uuid.uuid4().hex, model, version, reason, at, _rows(inputs, low, batch),
                     _rows(outputs, low, batch))  # fmt: skip

    def _score(self, checks: list[_Check]) -> None:
        """Score waiting calls, those of one model version and output width together, and keep the low."""
        groups: dict[tuple[str, str, int], list[_Check]] = {}
        for check in checks:
            first = next(iter(check.outputs.values()))
            groups.setdefault((check.model, check.version, first.shape[1]), []).append(check)
        assert self.threshold is not None
        for group in groups.values():
            firsts = [next(iter(c.outputs.values())) for c in group]
            offsets = np.cumsum([0] + [len(f) for f in firsts])
            scores = row_confidence(np.concatenate(firsts), self.config.confidence_measure)
            low_calls = np.unique(np.searchsorted(offsets, np.flatnonzero(scores < self.threshold), "right") - 1)
            for i in low_calls:  # only the calls with a row to keep cost more than the vectorised pass
                check = group[i]
                item = self._low_rows(check.model, check.version, check.at, check.inputs, check.outputs,
                                      scores[offsets[i] : offsets[i + 1]])  # fmt: skip
                if item is not None:
                    self._write(item)

    # the writer's side --------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.1)
            self._wake.clear()
            self._drain()

    def _drain(self) -> None:
        processed = 0
        while self._queue:
            processed += 1
            item = self._queue.popleft()
            try:
                self._write(item)
            except Exception:  # the writer never dies
                log.exception("keeping a hard example of %s failed", item.model)
        checks = [self._checks.popleft() for _ in range(len(self._checks))]
        processed += len(checks)
        try:
            if checks:
                self._score(checks)
        except Exception:
            log.exception("scoring %d calls for the low-confidence policy failed", len(checks))
        self._write_counts()
        with self._done:
            self._finished += processed
            self._done.notify_all()

    def _write_counts(self) -> None:
        with self._counts_lock:
            counts, self._counts = self._counts, Counter()
        try:
            self.spool.count(counts)
        except OSError as exc:
            log.warning("cannot write the hard-example counters: %s", exc)

    def _write(self, item: _Keep) -> None:
        header = ExampleHeader(item.example_id, self.device_id, item.model, item.version, item.reason, item.at)
        try:
            dropped = self.spool.add(HardExample(header, to_npz(item.inputs, item.outputs)),
                                     self.config.max_examples, self.config.max_bytes)  # fmt: skip
        except MessageError as exc:  # its npz is over the wire limit
            self._note("refused_too_large")
            log.warning("hard example of %s refused: %s", item.model, exc)
            return
        except Exception as exc:  # arrays neither numbers nor text, a full disk: its id was returned, so count it
            self._note("write_failed")
            log.warning("hard example %s of %s lost: %s", item.example_id, item.model, exc)
            return
        self._note("kept")
        if dropped:
            self._note("dropped_full", dropped)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every enqueued example is written (tests, shutdown); False on timeout."""
        with self._done:
            target = self._enqueued
            self._wake.set()
            done = self._done.wait_for(lambda: self._finished >= target, timeout_s)
        self._write_counts()  # also what callers counted without enqueuing (too large, queue full)
        return done

    def close(self) -> None:
        self.flush()
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
