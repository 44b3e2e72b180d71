"""The install journal: the deployment in flight per model, kept crash-safely so an agent killed at any
install step finishes (or reports) it on restart."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from edge_agent.protocol.atomic import atomic_write_bytes
from edge_agent.protocol.manifest import now_text

log = logging.getLogger(__name__)
JOURNAL_DIR = "journal"
FINAL_STEPS = ("activated", "failed")


class InstallJournal:
    """The deployment in flight per model, one small file each, rewritten at every step with
    write-fsync-rename: fetching → downloaded → installed → checked → activated | failed. A final
    entry is removed once reported; on start the agent finishes whatever a crash interrupted."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def record(self, name: str, version: str, artifact_id: str, step: str, error: str | None = None) -> None:
        entry = {"name": name, "version": version, "artifact_id": artifact_id, "step": step, "error": error,
                 "at": now_text()}  # fmt: skip
        atomic_write_bytes(self.root / f"{name}.json", json.dumps(entry).encode())

    def entries(self) -> list[dict[str, Any]]:
        found = []
        for path in sorted(self.root.glob("*.json")):
            try:
                found.append(json.loads(path.read_bytes()))
            except (OSError, ValueError) as exc:
                log.warning("dropping unreadable journal entry %s: %s", path.name, exc)
                path.unlink(missing_ok=True)
        return found

    def discard(self, name: str) -> None:
        (self.root / f"{name}.json").unlink(missing_ok=True)

    def remove_final(self) -> None:
        for entry in self.entries():
            if entry["step"] in FINAL_STEPS:
                self.discard(entry["name"])
