"""The rollout engine: drives each running rollout wave by wave, from what the registry says.

A tick (every ``tick_s``) takes each running rollout one step: deploy the current wave; wait for its
devices to finish installing (abort when too many failed); wait for the soak time and the minimum
calls; judge the health gates; then pass to the next wave after ``pause_s``, finish, or fail — and on
failure roll every device the rollout reached back to the version it ran before (a signed rollback,
``Hub.rollback``) unless the rollout says ``halt``. Every transition is saved before the next step, so
a hub restarted mid-rollout resumes it where it was.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from cloud_hub.errors import Conflict, NotFound
from cloud_hub.periodic import Periodic
from cloud_hub.rollouts.gates import Tally, Totals, judge
from cloud_hub.rollouts.spec import RolloutSpec
from cloud_hub.rollouts.store import FINAL, Rollout, RolloutStore
from cloud_hub.sqldb import SqlDb

log = logging.getLogger(__name__)


class RolloutEngine:
    def __init__(self, hub: Any, db: SqlDb | str, tick_s: float = 1.0) -> None:
        self.hub = hub  # deploy_devices, deployment, rollback, drift, registry
        self.store = RolloutStore(db)
        self.tally = Tally(hub.registry)
        self.tick_s = tick_s
        self._lock = threading.RLock()
        self._job = Periodic("rollout tick", tick_s, self.tick)

    def only_while(self, active: Callable[[], bool]) -> None:
        """Run the periodic job only while ``active()`` (the replica that leads, cloud_hub/leader.py)."""
        self._job.active = active

    def start(self) -> None:
        self._job.start()

    def stop(self) -> None:
        self._job.stop()
        self.store.close()

    # operator actions -------------------------------------------------------------------------
    def create(self, request: dict[str, Any]) -> dict[str, Any]:
        spec = RolloutSpec.from_json(request)
        devices = [d["device_id"] for d in self.hub.registry.devices_matching(spec.target)]
        if not devices:
            raise NotFound(f"no device matches {spec.target!r}; see 'cloud-hub devices list'")
        if not self.hub.registry.artifacts(spec.model, spec.version):
            raise NotFound(f"model {spec.model}@{spec.version} has no artifact; add one with 'cloud-hub models add'")
        with self._lock:
            busy = [r.id for r in self.store.list(("pending", "running", "paused")) if r.spec["model"] == spec.model
                    and set(devices) & {d for w in r.waves for d in w.devices}]  # fmt: skip
            if busy:
                raise Conflict(f"rollout {busy[0]} of {spec.model} is under way on some of these devices; "
                               f"abort it first ('cloud-hub rollout abort {busy[0]}')")  # fmt: skip
            previous = {d: self._active_version(d, spec.model) for d in devices}
            rollout_id = uuid.uuid4().hex[:12]
            rollout = self.store.create(spec.to_json(), spec.plan(devices, rollout_id), previous, rollout_id)
        if self._job.active():  # the leader starts it now; on another replica the leader's next beat does
            self.tick()
        return self.store.get(rollout.id).to_json()

    def _active_version(self, device_id: str, model: str) -> str | None:
        reported = self.hub.registry.device(device_id).get("reported") or {}
        found = [m for m in reported.get("models", []) if m["name"] == model and m["state"] == "active"]
        return found[0].get("version") if found else None

    def get(self, rollout_id: str) -> dict[str, Any]:
        return self.store.get(rollout_id).to_json()

    def list(self) -> list[dict[str, Any]]:
        return [r.to_json() for r in self.store.list()]

    def pause(self, rollout_id: str) -> dict[str, Any]:
        return self._change(rollout_id, ("running",), "paused", "paused by the operator")

    def resume(self, rollout_id: str) -> dict[str, Any]:
        """Go on; the wave's clocks (timeout, soak) skip the time it was paused."""
        with self._lock:
            rollout = self.store.get(rollout_id)
            paused_at = next(
                (e["at"] for e in reversed(rollout.events) if e["event"] == "paused by the operator"), None
            )
            if rollout.state == "paused" and paused_at is not None:
                wave, held = rollout.waves[rollout.current], time.time() - paused_at
                wave.started_at = wave.started_at + held if wave.started_at else None
                wave.active_at = wave.active_at + held if wave.active_at else None
                self.store.save(rollout)
            return self._change(rollout_id, ("paused",), "running", "resumed by the operator")

    def abort(self, rollout_id: str) -> dict[str, Any]:
        return self._change(rollout_id, ("pending", "running", "paused"), "aborted",
                            "aborted by the operator: no further wave; devices keep what they run")  # fmt: skip

    def rollback(self, rollout_id: str) -> dict[str, Any]:
        with self._lock:
            rollout = self.store.get(rollout_id)
            if rollout.state == "rolled-back":
                raise Conflict(f"rollout {rollout_id} is already rolled back")
            self._roll_back(rollout, "rolled back by the operator")
            return rollout.to_json()

    def _change(self, rollout_id: str, allowed: tuple[str, ...], state: str, why: str,
                attempts: int = 5) -> dict[str, Any]:  # fmt: skip
        """Set the state, read again and redone when the leader (another replica) changed it meanwhile."""
        with self._lock:
            for attempt in range(attempts):
                rollout = self.store.get(rollout_id)
                if rollout.state not in allowed:
                    raise Conflict(f"rollout {rollout_id} is {rollout.state}: it cannot be {state} "
                                   f"(only when {' or '.join(allowed)})")  # fmt: skip
                rollout.state = state
                rollout.event(why)
                try:
                    self.store.save(rollout)
                except Conflict:
                    if attempt == attempts - 1:
                        raise
                    continue
                break
            return rollout.to_json()

    # the engine --------------------------------------------------------------------------------
    def tick(self) -> None:
        with self._lock:
            self.tally.catch_up()
            for rollout in self.store.list(("running",)):
                if not self._job.active():  # no longer the leader: the next one goes on
                    return
                try:
                    self._step(rollout)
                except Conflict as exc:  # an operator (on another replica) changed it: read again next beat
                    log.info("%s", exc)

    def _step(self, rollout: Rollout) -> None:
        spec = RolloutSpec.from_json(rollout.spec)
        wave, now = rollout.waves[rollout.current], time.time()
        if wave.deployment_id is None:
            if rollout.current and now < (rollout.waves[rollout.current - 1].passed_at or now) + spec.pause_s:
                return
            deployed = self.hub.deploy_devices(spec.model, spec.version, wave.devices, f"rollout:{rollout.id}")
            wave.deployment_id, wave.started_at = deployed["deployment_id"], now
            wave.holdout = self._baseline(rollout, spec).to_json()
            rollout.event(f"wave {rollout.current + 1}: deployed to {len(wave.devices)} devices")
            return self.store.save(rollout)
        if wave.active_at is None and not self._installed(rollout, spec, wave, now):
            return None
        new = self.tally.sum(spec.model, dict.fromkeys(wave.devices, spec.version))
        old = self._baseline(rollout, spec).minus(Totals.from_json(wave.holdout)) if wave.holdout else Totals()
        if old.calls < spec.gates.min_calls:  # too few calls in the period: the wave's own devices' history
            old = self.tally.sum(spec.model, {d: rollout.previous.get(d) for d in wave.devices})
        passed, why, figures = judge(spec.gates, new, old, self._drift_score(spec))
        wave.verdict = {"passed": passed, "why": why, **figures}
        assert wave.active_at is not None
        if passed is None or (passed and now - wave.active_at < spec.gates.min_soak_s):
            if now - (wave.started_at or now) > spec.wave_timeout_s:
                return self._fail(rollout, spec, f"wave {rollout.current + 1} not judged within "
                                  f"{spec.wave_timeout_s:g} s: {why}")  # fmt: skip
            return self.store.save(rollout)
        if not passed:
            return self._fail(rollout, spec, f"wave {rollout.current + 1} failed its health gates: {why}")
        wave.passed_at = now
        rollout.event(f"wave {rollout.current + 1}: {why} ({figures['new']['calls']} calls)")
        if rollout.current + 1 == len(rollout.waves):
            rollout.state = "succeeded"
            rollout.event("succeeded: every wave passed")
        else:
            rollout.current += 1
        return self.store.save(rollout)

    def _baseline(self, rollout: Rollout, spec: RolloutSpec) -> Totals:
        """The totals a wave is compared with over the same period: the previous version's on the devices
        no wave has reached yet (a holdout) or, for the last wave, which has none, the new version's on
        the devices earlier waves reached (it passed its gates there against the previous version)."""
        later = [d for w in rollout.waves[rollout.current + 1 :] for d in w.devices]
        if later:
            return self.tally.sum(spec.model, {d: rollout.previous.get(d) for d in later})
        earlier = [d for w in rollout.waves[: rollout.current] for d in w.devices]
        return self.tally.sum(spec.model, dict.fromkeys(earlier, spec.version))

    def _installed(self, rollout: Rollout, spec: RolloutSpec, wave: Any, now: float) -> bool:
        """True once every device of the wave finished installing; fails the rollout when too many
        failed or the wave timed out."""
        states = self.hub.deployment(wave.deployment_id)["states"]
        failed = [d for d, s in states.items() if s["state"] == "failed"]
        finished = [d for d, s in states.items() if s["state"] in ("active", "failed", "overridden")]
        if finished and len(finished) >= min(spec.abort.min_devices, len(wave.devices)) and \
                len(failed) / len(finished) > spec.abort.failed_fraction:  # fmt: skip
            errors = sorted({str(states[d].get("error")) for d in failed})[:3]
            self._fail(
                rollout, spec, f"install failed on {len(failed)} of {len(finished)} devices: {'; '.join(errors)}"
            )
            return False
        if len(finished) < len(wave.devices):
            if now - (wave.started_at or now) > spec.wave_timeout_s:
                self._fail(rollout, spec, f"wave {rollout.current + 1}: {len(wave.devices) - len(finished)} devices "
                           f"not installed within {spec.wave_timeout_s:g} s")  # fmt: skip
            return False
        wave.active_at = now
        rollout.event(f"wave {rollout.current + 1}: installed on {len(finished) - len(failed)} devices")
        self.store.save(rollout)
        return True

    def _drift_score(self, spec: RolloutSpec) -> float | None:
        scores = [
            s for m, v, scope, _, s in self.hub.drift.scores() if (m, v, scope) == (spec.model, spec.version, "all")
        ]
        return max(scores) if scores else None

    def _fail(self, rollout: Rollout, spec: RolloutSpec, why: str) -> None:
        rollout.reason = why
        rollout.event(why)
        if spec.on_failure == "rollback":
            self._roll_back(rollout, f"rolled back automatically: {why}")
        else:
            rollout.state = "failed"
            self.store.save(rollout)

    def _roll_back(self, rollout: Rollout, why: str) -> None:
        """Every device the rollout reached back to its previous version (grouped by version)."""
        reached = [d for w in rollout.waves if w.deployment_id for d in w.devices]
        by_version: dict[str, list[str]] = defaultdict(list)
        for device in reached:
            previous = rollout.previous.get(device)
            if previous is not None and previous != rollout.spec["version"]:
                by_version[previous].append(device)
        sent, problems = [], []
        for version, devices in by_version.items():  # one signed rollback per previous version
            try:
                self.hub.rollback_devices(rollout.spec["model"], version, devices, f"rollback:{rollout.id}")
                sent.append(f"{len(devices)} to {version}")
            except Exception as exc:  # recorded, never retried each tick: the operator sees it in the events
                log.warning(
                    "rollout %s: rollback of %d devices to %s failed: %s", rollout.id, len(devices), version, exc
                )
                problems.append(f"{len(devices)} to {version} failed: {exc}")
        rollout.state = "rolled-back"
        rollout.reason = rollout.reason or why
        count = sum(map(len, by_version.values()))
        rollout.event(f"{why}: {count} devices sent back ({', '.join(sent) or 'none had a previous version'})"
                      + (f"; {'; '.join(problems)}" if problems else ""))  # fmt: skip
        self.store.save(rollout)


__all__ = ["FINAL", "RolloutEngine"]
