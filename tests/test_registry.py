"""The SQLite registry passes the shared Registry contract."""

from __future__ import annotations

from pathlib import Path

import pytest
from registry_contract import RegistryContract

from cloud_hub.registry import SQLiteRegistry


class TestSQLiteRegistry(RegistryContract):
    @pytest.fixture(autouse=True)
    def _registry(self, tmp_path: Path) -> None:
        self.registry = SQLiteRegistry(str(tmp_path / "registry.db"))
