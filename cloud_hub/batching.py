"""Dynamic batching for one served model on the inference server's event loop.

A request appends itself to the model's pending list and awaits a future. The first one schedules a
drain with ``call_soon``, which runs after every request that arrived in the same loop iteration has
queued too: the drain joins requests whose inputs share dtypes and trailing shapes along axis 0 (up
to ``max_batch_rows`` rows), runs the model once, splits the outputs back and resolves the futures.
An idle server thus answers at once (no thread hand-off, no timer); a busy one batches by itself.
With ``delay_s`` > 0 the drain waits that long for more. The pending list is bounded: past
``queue_size`` a request is refused at once (``QueueFull``); a request whose deadline passes while
pending leaves with ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
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
    future: asyncio.Future[dict[str, np.ndarray]]


def _signature(inputs: Inputs) -> tuple[Any, ...]:
    return tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(inputs.items()))


class Batcher:
    """Must be used from one event loop (the server's)."""

    def __init__(self, run: Callable[[Inputs], dict[str, np.ndarray]], max_batch_rows: int = 32,
                 delay_s: float = 0.0, queue_size: int = 256, name: str = "model") -> None:  # fmt: skip
        self.run, self.max_batch_rows, self.delay_s = run, max_batch_rows, delay_s
        self.queue_size, self.name = queue_size, name
        self.executions = 0
        self.rows_executed = 0
        self._pending: list[Pending] = []
        self._scheduled = False

    async def submit(self, inputs: Inputs, timeout_s: float | None) -> dict[str, np.ndarray]:
        """Run ``inputs`` in some batch; QueueFull when too many wait, TimeoutError past ``timeout_s``."""
        if len(self._pending) >= self.queue_size:
            raise QueueFull(f"the queue ({self.queue_size}) is full")
        loop = asyncio.get_running_loop()
        pending = Pending(inputs, len(next(iter(inputs.values()))) if inputs else 1, loop.create_future())
        self._pending.append(pending)
        if not self._scheduled:
            self._scheduled = True
            if self.delay_s > 0:
                loop.call_later(self.delay_s, self._drain)
            else:
                loop.call_soon(self._drain)
        try:
            return await asyncio.wait_for(asyncio.shield(pending.future), timeout_s)
        except TimeoutError:
            if pending in self._pending:
                self._pending.remove(pending)
            raise TimeoutError("deadline passed while queued") from None

    def _drain(self) -> None:
        self._scheduled = False
        while self._pending:
            batch: list[Pending] = []
            rows = 0
            while self._pending and (not batch or rows + self._pending[0].rows <= self.max_batch_rows):
                batch.append(self._pending.pop(0))
                rows += batch[-1].rows
            groups: dict[tuple[Any, ...], list[Pending]] = {}
            for pending in batch:
                groups.setdefault(_signature(pending.inputs), []).append(pending)
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
        except Exception as exc:  # every waiter gets the error; the next drain carries on
            for pending in group:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        self.executions += 1
        self.rows_executed += sum(p.rows for p in group)
        for pending, outputs_i in zip(group, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(outputs_i)
