"""The device's hard-example spool: a directory, separate from the telemetry spool, shared by the apps
that keep examples (``examples.py``) and the agent that uploads them (``example_upload.py``).

    STATE/examples/{time_ns:019d}-{example_id}.efx   one example: exactly its wire frame (HardExample)
    STATE/examples/counters.json                      counters (written atomically, under the lock)
    STATE/examples/.lock                              flock: one writer at a time across processes

Every file is written atomically (temporary name, fsync, rename, fsync of the directory), so a crash
leaves a whole example or none; a temporary file a crash left behind is removed when a spool opens
it. The caps (examples and bytes, the writer's) are enforced after each write: the oldest examples
are removed first and counted (``dropped_full``). The agent removes an example once the hub has
acknowledged it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from edge_agent.protocol.atomic import atomic_write_bytes
from edge_agent.protocol.messages import HardExample

log = logging.getLogger(__name__)
EXAMPLES_DIR = "examples"
SUFFIX = ".efx"
COUNTERS_FILE = "counters.json"
STALE_TMP_S = 600.0
# kept: written to the spool; dropped_full: oldest removed for the caps; refused_too_large: over the
# size limit (never copied or written); dropped_queue: the app's in-memory queue was full; rate_limited:
# low-confidence samples over the policy's rate; unchecked: calls the low-confidence policy skipped
# because its writer was behind; uploaded: acknowledged by the hub; refused_by_hub: the
# hub refused one for good; unreadable: a spooled file that could not be read (removed); write_failed: one
# the writer could not write (arrays neither numbers nor text, a full disk), after ``keep`` returned its id
COUNTERS = ("kept", "dropped_full", "refused_too_large", "dropped_queue", "rate_limited", "unchecked", "uploaded",
            "refused_by_hub", "unreadable", "write_failed")  # fmt: skip


@dataclass(frozen=True)
class Entry:
    example_id: str
    path: Path
    size: int


class ExampleSpool:
    """Examples waiting for the hub, oldest first. Safe for several processes at once."""

    def __init__(self, directory: str | Path, create: bool = True) -> None:
        """``create=False`` (the agent, ``edge-agent status``): a device whose apps never opted in keeps
        no directory; reading a missing one finds nothing."""
        self.directory = Path(directory)
        if create:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.directory / ".lock"
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        """``atomic_write_bytes`` leaves ``.NAME.*.tmp`` behind only when killed mid-write."""
        now = time.time()
        for path in self.directory.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > STALE_TMP_S:
                    path.unlink()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self._lock_path, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def entries(self) -> list[Entry]:
        """Spooled examples, oldest first."""
        found = []
        for path in self.directory.glob(f"*{SUFFIX}"):
            try:
                size = path.stat().st_size
            except FileNotFoundError:  # uploaded (or dropped) meanwhile
                continue
            found.append(Entry(path.stem.partition("-")[2], path, size))
        return sorted(found, key=lambda e: e.path.name)

    def add(self, example: HardExample, max_examples: int, max_bytes: int) -> int:
        """Write ``example`` (MessageError when its frame is over the wire limit), then remove the oldest
        examples until at most ``max_examples`` and ``max_bytes`` remain; returns how many it removed."""
        payload = example.to_wire()
        name = f"{time.time_ns():019d}-{example.header.example_id}{SUFFIX}"
        with self._locked():
            atomic_write_bytes(self.directory / name, payload)
            dropped = self._trim(max_examples, max_bytes)
        return dropped

    def _trim(self, max_examples: int, max_bytes: int) -> int:
        entries = self.entries()
        total = sum(e.size for e in entries)
        dropped = 0
        while entries and (len(entries) > max_examples or total > max_bytes):
            oldest = entries.pop(0)
            total -= oldest.size
            try:
                oldest.path.unlink()
            except FileNotFoundError:  # (removed by something outside the lock: not ours to count)
                continue
            dropped += 1
        return dropped

    def read(self, entry: Entry) -> bytes | None:
        """The example's wire frame; None when it is gone (uploaded by another agent run, dropped)."""
        try:
            return entry.path.read_bytes()
        except FileNotFoundError:
            return None

    def remove(self, example_id: str) -> bool:
        """Remove an acknowledged example; False when it is not (or no longer) here."""
        removed = False
        if not self.directory.is_dir():
            return False
        with self._locked():  # never while a writer trims: each example is counted once
            for path in self.directory.glob(f"*-{example_id}{SUFFIX}"):
                path.unlink(missing_ok=True)
                removed = True
        return removed

    def count(self, deltas: Mapping[str, int]) -> None:
        """Add ``deltas`` to the counters (one locked read-modify-write, written atomically)."""
        deltas = {k: v for k, v in deltas.items() if v}
        if not deltas:
            return
        with self._locked():
            counters = self.counters()
            for key, value in deltas.items():
                counters[key] = counters.get(key, 0) + value
            atomic_write_bytes(self.directory / COUNTERS_FILE, json.dumps(counters, sort_keys=True).encode())

    def counters(self) -> dict[str, int]:
        """Every counter in COUNTERS (0 when never counted)."""
        try:
            stored = json.loads((self.directory / COUNTERS_FILE).read_text())
        except (FileNotFoundError, ValueError):
            stored = {}
        return {key: int(stored.get(key, 0)) for key in COUNTERS}

    def status(self) -> dict[str, int]:
        """The counters, plus ``spooled`` (examples waiting) and ``spooled_bytes``."""
        entries = self.entries()
        return {**self.counters(), "spooled": len(entries), "spooled_bytes": sum(e.size for e in entries)}


def spool_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / EXAMPLES_DIR
