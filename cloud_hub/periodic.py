"""A background job run every few seconds by the hub (the drift job, the rollout engine): one thread,
stopped cleanly, and a failing run logged and retried on the next beat, never the end of the job."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    def __init__(self, name: str, interval_s: float, run: Callable[[], None]) -> None:
        self.name, self.interval_s, self._run = name, interval_s, run
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"edgefed-{name}", daemon=True)
        self.active: Callable[[], bool] = lambda: True  # a beat runs the job only while this says so (leader)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self.active():
                continue
            try:
                self._run()
            except Exception:  # the job must outlive one bad run; the next one repeats it
                log.exception("%s failed", self.name)
