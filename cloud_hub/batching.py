"""Dynamic batching for one served model.

Requests wait in a bounded queue; one worker thread takes whatever is queued when it is free (up to
``max_batch_rows`` rows; with ``delay_s`` > 0 it also waits that long for more), joins requests whose
inputs share dtypes and trailing shapes along axis 0, runs once, and splits the outputs back. When the
model is idle (nothing queued, nothing running) a request runs at once in the caller's thread, so an
idle server adds no delay and no thread hand-off; a busy one batches by itself. A full queue is refused at once
(``QueueFull``) instead of growing; a request whose caller gave up is skipped.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Inputs = dict[str, np.ndarray]


class QueueFull(Exception):
    pass


@dataclass
class Pending:
    inputs: Inputs
    rows: int
    done: threading.Event = field(default_factory=threading.Event)
    outputs: dict[str, np.ndarray] | None = None
    error: BaseException | None = None
    cancelled: bool = False


def _signature(inputs: Inputs) -> tuple[Any, ...]:
    return tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(inputs.items()))


class Batcher:
    def __init__(self, run: Callable[[Inputs], dict[str, np.ndarray]], max_batch_rows: int = 32,
                 delay_s: float = 0.0, queue_size: int = 256, name: str = "model") -> None:  # fmt: skip
        self.run, self.max_batch_rows, self.delay_s = run, max_batch_rows, delay_s
        self.queue: queue.Queue[Pending] = queue.Queue(maxsize=queue_size)
        self.executions = 0
        self.rows_executed = 0
        self._busy = threading.Lock()  # held while a batch (or an inline request) runs
        self._stop = False
        self._thread = threading.Thread(target=self._work, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, inputs: Inputs, timeout_s: float | None) -> dict[str, np.ndarray]:
        """Run ``inputs`` in some batch; QueueFull when the queue is full, TimeoutError past ``timeout_s``."""
        if self.delay_s == 0 and self.queue.empty() and self._busy.acquire(blocking=False):
            try:  # idle: run inline, no hand-off
                outputs = self.run(inputs)
                self.executions += 1
                return outputs
            finally:
                self._busy.release()
        rows = len(next(iter(inputs.values()))) if inputs else 1
        pending = Pending(inputs, rows)
        try:
            self.queue.put_nowait(pending)
        except queue.Full:
            raise QueueFull(f"the queue ({self.queue.maxsize}) is full") from None
        if not pending.done.wait(timeout_s):
            pending.cancelled = True
            raise TimeoutError("deadline passed while queued or running")
        if pending.error is not None:
            raise pending.error
        assert pending.outputs is not None
        return pending.outputs

    def _take(self) -> list[Pending]:
        batch = [self.queue.get()]
        rows = batch[0].rows
        deadline = time.monotonic() + self.delay_s
        while rows < self.max_batch_rows:
            try:
                remaining = deadline - time.monotonic()
                item = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            batch.append(item)
            rows += item.rows
        return [p for p in batch if not p.cancelled]

    def _work(self) -> None:
        while not self._stop:
            batch = self._take()
            groups: dict[tuple[Any, ...], list[Pending]] = {}
            for pending in batch:
                groups.setdefault(_signature(pending.inputs), []).append(pending)
            with self._busy:
                for group in groups.values():
                    self._run_group(group)

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
                pending.outputs = outputs_i
                pending.done.set()
        except BaseException as exc:  # answer every waiter, keep the worker alive
            for pending in group:
                pending.error = exc
                pending.done.set()

    def stop(self) -> None:
        self._stop = True
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(Pending({}, 0, cancelled=True))  # wake the worker
