"""Hard examples at the hub: what devices upload on ``devices/{id}/examples`` (opt-in on the device, never
by default) is stored for retraining and acknowledged on ``devices/{id}/examples/ack``.

    STATE/examples/examples.db          the index (SQLite, WAL): one row per example id
    STATE/examples/{example_id}.npz     its arrays as the device sent them (``input/NAME``, ``output/NAME``)

``ExampleStore`` is the storage contract (one implementation here). An example is stored once per id:
a copy sent again (an agent that died before the ack) is acknowledged again and counted as a
duplicate. The .npz is written atomically before its row, so a crash leaves at worst a file with no
row, which the re-sent copy replaces. Each device keeps at most ``max_per_device`` examples: past it
the device's oldest are removed, counted (``dropped``). Arrays that are not a readable .npz (no
pickles) are refused for good: the ack carries the error, so the device drops them too.
"""

from __future__ import annotations

import io
import logging
import sqlite3
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from cloud_hub.errors import NotFound
from edge_agent.mqtt import MqttConnection
from edge_agent.protocol.atomic import atomic_write_bytes
from edge_agent.protocol.messages import HardExample, HardExampleAck, to_wire
from edge_agent.protocol.topics import Topics

log = logging.getLogger(__name__)
EXAMPLES_DIR = "examples"
MAX_PER_DEVICE = 10_000
MAX_EXPANDED_BYTES = 16 * 1024 * 1024  # an example's arrays, uncompressed: more is refused
_SCHEMA = """CREATE TABLE IF NOT EXISTS examples (
    example_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL,
    reason TEXT NOT NULL, at REAL NOT NULL, received REAL NOT NULL, bytes INTEGER NOT NULL, arrays TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS examples_device ON examples (device_id, received);
CREATE INDEX IF NOT EXISTS examples_model ON examples (model, received)"""
_COLUMNS = ("example_id", "device_id", "model", "version", "reason", "at", "received", "bytes", "arrays")


def array_names(npz: bytes) -> list[str]:
    """The arrays of an .npz; ValueError when it is not one numpy reads without pickles, or when its
    members expand to more than MAX_EXPANDED_BYTES (checked before anything is decompressed: a few
    hundred KiB of zeros compressed expand to hundreds of MiB)."""
    try:
        with zipfile.ZipFile(io.BytesIO(npz)) as archive:  # zipfile stops each member at its file_size
            expanded = sum(info.file_size for info in archive.infolist())
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"the arrays are not a readable .npz ({exc})") from None
    if expanded > MAX_EXPANDED_BYTES:
        raise ValueError(f"the arrays expand to {expanded} bytes, over the limit of {MAX_EXPANDED_BYTES}")
    try:
        with np.load(io.BytesIO(npz), allow_pickle=False) as arrays:
            names = list(arrays.files)
            for name in names:
                arrays[name]  # reads (and so checks) every array
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, MemoryError) as exc:  # Memory: a lying .npy header
        raise ValueError(f"the arrays are not a readable .npz ({exc})") from None
    return names


class ExampleStore:
    """Thread-safe. ``add`` → True when new; ``list`` newest first; ``read`` the .npz bytes."""

    def __init__(self, directory: str | Path, max_per_device: int = MAX_PER_DEVICE) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_per_device = max_per_device
        self._db = sqlite3.connect(self.directory / "examples.db", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self.counters = {"stored": 0, "duplicates": 0, "dropped": 0, "refused": 0}

    def add(self, device_id: str, example: HardExample) -> bool:
        """Store ``example`` from ``device_id`` once (ValueError when its arrays are unreadable)."""
        header = example.header
        with self._lock:
            if self._db.execute("SELECT 1 FROM examples WHERE example_id = ?", (header.example_id,)).fetchone():
                self.counters["duplicates"] += 1
                return False
        try:
            names = array_names(example.npz)
        except ValueError:
            with self._lock:
                self.counters["refused"] += 1
            raise
        atomic_write_bytes(self.directory / f"{header.example_id}.npz", example.npz)
        row = (header.example_id, device_id, header.model, header.version, header.reason, header.at, time.time(),
               len(example.npz), ",".join(names))  # fmt: skip
        with self._lock:
            inserted = self._db.execute(f"INSERT OR IGNORE INTO examples VALUES ({','.join('?' * len(row))})", row)
            if not inserted.rowcount:
                self.counters["duplicates"] += 1
                return False
            self.counters["stored"] += 1
            self._trim(device_id)
        return True

    def _trim(self, device_id: str) -> None:
        over = self._db.execute(
            "SELECT example_id FROM examples WHERE device_id = ? ORDER BY received DESC, rowid DESC LIMIT -1 OFFSET ?",
            (device_id, self.max_per_device),
        ).fetchall()
        for (example_id,) in over:
            self._db.execute("DELETE FROM examples WHERE example_id = ?", (example_id,))
            (self.directory / f"{example_id}.npz").unlink(missing_ok=True)
            self.counters["dropped"] += 1
        if over:
            log.info("device %s is over %d hard examples: removed its %d oldest", device_id, self.max_per_device,
                     len(over))  # fmt: skip

    def list(self, model: str | None = None, device: str | None = None) -> list[dict[str, Any]]:
        """Examples (no arrays; ``arrays`` names them), newest first, filtered by model and device."""
        where, args = [], []
        for column, value in (("model", model), ("device_id", device)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        sql = f"SELECT {', '.join(_COLUMNS)} FROM examples"
        sql += f" WHERE {' AND '.join(where)}" if where else ""
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY received DESC, rowid DESC", args).fetchall()
        return [{**dict(zip(_COLUMNS, row, strict=True)), "arrays": row[-1].split(",") if row[-1] else []}
                for row in rows]  # fmt: skip

    def read(self, example_id: str) -> bytes:
        """The example's .npz; NotFound naming the command that lists them."""
        with self._lock:
            known = self._db.execute("SELECT 1 FROM examples WHERE example_id = ?", (example_id,)).fetchone()
        path = self.directory / f"{example_id}.npz"
        if not known or not path.is_file():
            raise NotFound(f"hard example {example_id!r} is unknown; see 'cloud-hub examples list'")
        return path.read_bytes()

    def close(self) -> None:
        with self._lock:
            self._db.close()


class ExampleIngest:
    """Subscribes the hub's MQTT connection to every device's examples, stores and acknowledges them."""

    def __init__(self, store: ExampleStore, mqtt: MqttConnection, topics: Topics, shared_as: str | None = None) -> None:
        """``shared_as``: the replicas' shared subscription to the examples topic (``topics.shared``)."""
        self.store, self.mqtt, self.topics = store, mqtt, topics
        mqtt.route(topics.all_devices("examples"), self._on_example, shared_as=shared_as)

    def _on_example(self, topic: str, payload: bytes) -> None:
        parsed = self.topics.parse_device_topic(topic)
        if parsed is None:
            raise ValueError(f"not a device topic: {topic}")
        device_id = parsed[0]  # the topic names the device (the broker's ACL confines it to its own)
        example = HardExample.from_wire(payload)  # MessageError: counted as malformed, never acknowledged
        error = ""
        try:
            self.store.add(device_id, example)
        except ValueError as exc:
            error = str(exc)
            log.warning("refused hard example %s from %s: %s", example.header.example_id, device_id, error)
        ack = HardExampleAck(example.header.example_id, error)
        self.mqtt.publish(self.topics.examples_ack(device_id), to_wire(ack))
