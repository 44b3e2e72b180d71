"""Rollout records in the hub's registry database (``Registry.sql_db()``: SQLite or PostgreSQL): one row
per rollout, each change one statement, so a restarted hub, or another replica on the same PostgreSQL
database, resumes every rollout from the state it last recorded."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from cloud_hub.errors import Conflict, NotFound
from cloud_hub.sqldb import Row, SqlDb, open_db

STATES = ("pending", "running", "paused", "succeeded", "failed", "rolled-back", "aborted")
FINAL = ("succeeded", "failed", "rolled-back", "aborted")
_COLUMNS = ("id", "created", "updated", "state", "spec", "waves", "previous", "current", "reason", "events")
_TABLE = """CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, created {real} NOT NULL, updated {real} NOT NULL, state TEXT NOT NULL,
    spec TEXT NOT NULL, waves TEXT NOT NULL, previous TEXT NOT NULL, current INTEGER NOT NULL,
    reason TEXT, events TEXT NOT NULL)"""
_INDEX = "CREATE INDEX IF NOT EXISTS rollouts_state ON rollouts (state)"
_INSERT = f"INSERT INTO rollouts ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
# a change is written only over the version it was made from (``updated``): another replica's change in
# between (an operator's abort on one, the leader's next wave on another) is never overwritten
_UPDATE = f"UPDATE rollouts SET {', '.join(f'{c} = ?' for c in _COLUMNS[1:])} WHERE id = ? AND updated = ? RETURNING id"


@dataclass
class Wave:
    devices: list[str]
    deployment_id: str | None = None
    started_at: float | None = None  # deployed
    active_at: float | None = None  # every device finished installing (active or failed)
    passed_at: float | None = None  # gates passed
    verdict: dict[str, Any] = field(default_factory=dict)  # the last gate evaluation
    holdout: dict[str, Any] = field(default_factory=dict)  # engine._baseline when the wave was deployed


@dataclass
class Rollout:
    id: str
    created: float
    state: str
    spec: dict[str, Any]
    waves: list[Wave]
    previous: dict[str, str | None]  # device → the version it ran before (None: the model was new there)
    current: int = 0  # the wave under way
    reason: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    updated: float = 0.0

    def event(self, text: str) -> None:
        self.events.append({"at": time.time(), "event": text})
        del self.events[:-200]  # the newest 200

    def to_json(self) -> dict[str, Any]:
        waves = [w.__dict__ for w in self.waves]
        deployed = sum(len(w.devices) for w in self.waves[: self.current + 1] if w.deployment_id)
        return {"id": self.id, "created": self.created, "updated": self.updated, "state": self.state,
                "model": self.spec["model"], "version": self.spec["version"], "target": self.spec["target"],
                "strategy": self.spec["strategy"], "current_wave": self.current, "waves": waves,
                "devices": sum(len(w.devices) for w in self.waves), "deployed": deployed, "reason": self.reason,
                "previous": self.previous, "spec": self.spec, "events": self.events}  # fmt: skip


class RolloutStore:
    def __init__(self, db: SqlDb | str) -> None:
        """``db``: the registry's ``sql_db()``, or a SQLite file's path."""
        self.db, self._owned = open_db(db)
        self.db.ddl(sqlite=[_TABLE.format(real="REAL"), _INDEX],
                    postgresql=[_TABLE.format(real="DOUBLE PRECISION"), _INDEX])  # fmt: skip

    def close(self) -> None:
        if self._owned:
            self.db.close()

    def create(self, spec: dict[str, Any], waves: list[list[str]], previous: dict[str, str | None],
               rollout_id: str) -> Rollout:  # fmt: skip
        rollout = Rollout(rollout_id, time.time(), "running", spec,
                          [Wave(devices) for devices in waves], previous)  # fmt: skip
        rollout.event(f"started: {len(waves)} waves of {', '.join(str(len(w)) for w in waves)} devices")
        self.save(rollout)
        return rollout

    def save(self, rollout: Rollout) -> None:
        """Record ``rollout``: a new one, or a change to the version it was read at; Conflict when the
        record changed since (another hub replica's change: read it again and redo the change)."""
        read_at, rollout.updated = rollout.updated, max(time.time(), rollout.updated + 1e-6)
        row = (rollout.id, rollout.created, rollout.updated, rollout.state, json.dumps(rollout.spec),
               json.dumps([w.__dict__ for w in rollout.waves]), json.dumps(rollout.previous), rollout.current,
               rollout.reason, json.dumps(rollout.events))  # fmt: skip
        if not read_at:
            self.db.execute(_INSERT, row)
        elif not self.db.execute(_UPDATE, (*row[1:], rollout.id, read_at)):
            rollout.updated = read_at
            raise Conflict(f"rollout {rollout.id} was changed meanwhile (by another hub replica); try again")

    def get(self, rollout_id: str) -> Rollout:
        rows = self.db.execute("SELECT * FROM rollouts WHERE id = ?", [rollout_id])
        if not rows:
            raise NotFound(f"rollout {rollout_id!r} is unknown; see 'cloud-hub rollout list'")
        return _rollout(rows[0])

    def list(self, states: tuple[str, ...] = STATES) -> list[Rollout]:
        marks = ", ".join("?" * len(states))
        rows = self.db.execute(f"SELECT * FROM rollouts WHERE state IN ({marks}) ORDER BY created DESC", states)
        return [_rollout(r) for r in rows]


def _rollout(row: Row) -> Rollout:
    waves = [Wave(**w) for w in json.loads(row["waves"])]
    return Rollout(row["id"], row["created"], row["state"], json.loads(row["spec"]), waves, json.loads(row["previous"]),
                   row["current"], row["reason"], json.loads(row["events"]), row["updated"])  # fmt: skip
