"""The SQLite and PostgreSQL registries pass the shared Registry contract; PostgreSQL also stores a batch
once when two registries (as two hub replicas would) receive it at the same time."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_contract import RegistryContract

from cloud_hub.registry import SQLiteRegistry, open_registry
from edge_agent.protocol.messages import TelemetryBatch, TelemetryWindow


class TestSQLiteRegistry(RegistryContract):
    @pytest.fixture(autouse=True)
    def _registry(self, tmp_path: Path) -> Iterator[None]:
        self.registry = SQLiteRegistry(str(tmp_path / "registry.db"))
        yield
        self.registry.close()


class TestPostgreSQLRegistry(RegistryContract):
    @pytest.fixture(autouse=True)
    def _registry(self, postgres_url: str) -> Iterator[None]:
        self.registry = open_registry(postgres_url)
        yield
        self.registry.close()

    def test_replicas_store_each_batch_once(self, postgres_url: str) -> None:
        """Two registries on one database, 4 threads each, every batch sent by all 8: stored once, and
        telemetry_after sees each once, in cursor order."""
        other = open_registry(postgres_url)
        window = TelemetryWindow("gemm", "1.0.0", "local", 1.0, 2.0, 3, 0, 0.3, (3,))
        batches = [TelemetryBatch(f"d{i % 5}", i, (window,), epoch="e") for i in range(1, 61)]
        stored: list[bool] = []

        def send(registry: object) -> None:
            for batch in batches:
                stored.append(registry.add_telemetry(batch))  # type: ignore[attr-defined]

        threads = [threading.Thread(target=send, args=(r,)) for r in (self.registry, other) * 4]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        other.close()
        assert stored.count(True) == 60 and len(stored) == 480
        rows = self.registry.telemetry_after(0, limit=1000)
        assert sorted((r["device_id"], r["seq"]) for r in rows) == sorted((b.device_id, b.seq) for b in batches)
        cursors = [r["cursor"] for r in rows]
        assert cursors == sorted(cursors) and self.registry.telemetry_after(cursors[29], limit=1000) == rows[30:]
