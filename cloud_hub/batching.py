"""Dynamic batching for one served model, leader/follower style (no batching thread).

A request joins a bounded queue. If no other request is running the model, its own handler thread
becomes the leader: it takes what is queued (up to ``max_batch_rows`` rows; with ``delay_s`` > 0 it
first waits that long for more), joins requests whose inputs share dtypes and trailing shapes along
axis 0, runs once, splits the outputs back and wakes the waiters. Requests that arrive meanwhile wait,
and the next leader takes them all at once. An idle model therefore runs a request at once in its own
thread (no hand-off, no delay) and a busy one batches by itself. A full queue is refused at once
(``QueueFull``); a request whose deadline passes while queued leaves the queue with ``TimeoutError``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

Inputs = dict[str, np.ndarray]


class QueueFull(Exception):
    pass


@dataclass
class Pending:
    inputs: Inputs
    rows: int
    done: bool = False
    outputs: dict[str, np.ndarray] | None = None
    error: BaseException | None = None


def _signature(inputs: Inputs) -> tuple[Any, ...]:
    return tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(inputs.items()))


class Batcher:
    def __init__(self, run: Callable[[Inputs], dict[str, np.ndarray]], max_batch_rows: int = 32,
                 delay_s: float = 0.0, queue_size: int = 256, name: str = "model") -> None:  # fmt: skip
        self.run, self.max_batch_rows, self.delay_s = run, max_batch_rows, delay_s
        self.queue_size, self.name = queue_size, name
        self.executions = 0
        self.rows_executed = 0
        self._queue: deque[Pending] = deque()
        self._leading = False
        self._cv = threading.Condition()

    def submit(self, inputs: Inputs, timeout_s: float | None) -> dict[str, np.ndarray]:
        """Run ``inputs`` in some batch; QueueFull when the queue is full, TimeoutError past ``timeout_s``."""
        pending = Pending(inputs, len(next(iter(inputs.values()))) if inputs else 1)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cv:
            if len(self._queue) >= self.queue_size:
                raise QueueFull(f"the queue ({self.queue_size}) is full")
            self._queue.append(pending)
            while not pending.done:
                if not self._leading:
                    self._lead()
                    continue
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    if pending in self._queue:
                        self._queue.remove(pending)
                    raise TimeoutError("deadline passed while queued")
                self._cv.wait(remaining)
        if pending.error is not None:
            raise pending.error
        assert pending.outputs is not None
        return pending.outputs

    def _lead(self) -> None:
        """Called with the lock held: take a batch, run it unlocked, wake everyone."""
        self._leading = True
        try:
            if self.delay_s > 0:
                end = time.monotonic() + self.delay_s
                while sum(p.rows for p in self._queue) < self.max_batch_rows and time.monotonic() < end:
                    self._cv.wait(end - time.monotonic())
            batch: list[Pending] = []
            rows = 0
            while self._queue and (not batch or rows + self._queue[0].rows <= self.max_batch_rows):
                batch.append(self._queue.popleft())
                rows += batch[-1].rows
            self._cv.release()
            try:
                groups: dict[tuple[Any, ...], list[Pending]] = {}
                for pending in batch:
                    groups.setdefault(_signature(pending.inputs), []).append(pending)
                for group in groups.values():
                    self._run_group(group)
            finally:
                self._cv.acquire()
        finally:
            self._leading = False
            self._cv.notify_all()

    def _run_group(self, group: list[Pending]) -> None:
        try:
            if len(group) == 1:
                results = [self.run(group[0].inputs)]
            else:
                joined = {n: np.concatenate([p.inputs[n] for p in group]) for n in group[0].inputs}
                outputs = self.run(joined)
                cuts = np.cumsum([p.rows for p in group])[:-1]
                parts = {n: np.split(v, cuts) for n, v in outputs.items()}
                results = [{n: parts[n][i] for n in parts} for i in range(len(group))]
            self.executions += 1
            self.rows_executed += sum(p.rows for p in group)
            for pending, outputs_i in zip(group, results, strict=True):
                pending.outputs, pending.done = outputs_i, True
        except Exception as exc:  # every waiter gets the error; the next leader carries on
            for pending in group:
                pending.error, pending.done = exc, True

    def stop(self) -> None:
        """Nothing runs in the background; kept so callers need not know."""
