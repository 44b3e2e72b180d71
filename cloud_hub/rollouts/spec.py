"""What an operator asks of a rollout: strategy, waves, health gates, abort criteria, what to do on
failure. Parsed once, with errors that name the field and the fix; stored as JSON with the rollout."""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

STRATEGIES = ("all", "canary", "waves")
ON_FAILURE = ("rollback", "halt")


class SpecError(ValueError):
    """A rollout request the hub cannot run; the message names the field and the fix."""


@dataclass(frozen=True)
class Gates:
    """Health gates a wave must pass: the new version's telemetry on the wave's devices against the
    previous version's over the same period on the devices the rollout has not reached yet (a holdout:
    the same load, the same hour); the last wave, which has no holdout, against the new version's on the
    devices earlier waves reached, over the same period; and when those made fewer than ``min_calls``
    calls, against the previous version's history on the wave's own devices. Ratios compare rates (with
    ``slack`` added to the previous rate, so 0 errors before does not make 1 error after infinitely
    worse; ``latency_slack_ms`` likewise for p95); ``max_error_rate`` is absolute. With fewer than
    ``min_calls`` previous calls either way, only the absolute limits judge."""

    min_calls: int = 200  # new-version calls on the wave before it may pass
    min_soak_s: float = 30.0  # and this long after its devices are active
    max_error_rate: float = 0.05
    max_error_ratio: float = 2.0
    max_p95_ratio: float = 1.5
    max_fallback_ratio: float = 2.0
    max_breach_ratio: float = 2.0
    slack: float = 0.01
    latency_slack_ms: float = 0.05  # added to the previous p95: one bin of the telemetry's latency histogram
    max_drift_score: float | None = 1.0  # the drift job's score (≥ 1: alarming); None: not a gate

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Gates:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise SpecError(
                f"gates: unknown {', '.join(sorted(unknown))}; known: {', '.join(cls.__dataclass_fields__)}"
            )
        gates = cls(**data)
        for name, value in asdict(gates).items():
            if value is not None and (not isinstance(value, int | float) or not math.isfinite(value) or value < 0):
                raise SpecError(f"gates.{name}: {value!r} must be a finite number ≥ 0")
        return gates


@dataclass(frozen=True)
class Abort:
    """Like AWS IoT Jobs: stop when more than ``failed_fraction`` of a wave's devices that finished
    installing failed, once at least ``min_devices`` (or the whole wave, if smaller) finished."""

    failed_fraction: float = 0.1
    min_devices: int = 5


@dataclass(frozen=True)
class RolloutSpec:
    model: str
    version: str
    target: str
    strategy: str = "waves"
    canary: str = "5%"
    waves: tuple[str, ...] = ("5%", "25%", "100%")
    pause_s: float = 0.0
    gates: Gates = field(default_factory=Gates)
    abort: Abort = field(default_factory=Abort)
    on_failure: str = "rollback"
    wave_timeout_s: float = 900.0  # a wave not judged by then (devices pending, too few calls) fails

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutSpec:
        for name in ("model", "version", "target"):
            if not isinstance(data.get(name), str) or not data[name]:
                raise SpecError(f"{name}: required (a string)")
        strategy = data.get("strategy", "waves")
        if strategy not in STRATEGIES:
            raise SpecError(f"strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
        on_failure = data.get("on_failure", "rollback")
        if on_failure not in ON_FAILURE:
            raise SpecError(f"on_failure {on_failure!r}: use rollback or halt")
        waves = tuple(str(w) for w in data.get("waves", cls.waves))
        canary = str(data.get("canary", cls.canary))
        for wave in (*waves, canary if strategy == "canary" else "1"):
            if not wave.startswith("device:"):
                _size(wave, 1)  # refuses a malformed size now, not at the first wave
        abort = data.get("abort", {})
        spec = cls(data["model"], data["version"], data["target"], strategy, canary, waves,
                   float(data.get("pause_s", 0.0)), Gates.from_json(data.get("gates", {})),
                   Abort(float(abort.get("failed_fraction", 0.1)), int(abort.get("min_devices", 5))),
                   on_failure, float(data.get("wave_timeout_s", 900.0)))  # fmt: skip
        numbers = (spec.pause_s, spec.wave_timeout_s, spec.abort.failed_fraction)
        if not all(map(math.isfinite, numbers)) or spec.pause_s < 0 or spec.wave_timeout_s <= 0:
            raise SpecError("pause_s must be ≥ 0 and wave_timeout_s > 0 (finite numbers)")
        if not 0 <= spec.abort.failed_fraction <= 1 or spec.abort.min_devices < 1:
            raise SpecError("abort: failed_fraction between 0 and 1, min_devices ≥ 1")
        return spec

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def plan(self, devices: list[str], salt: str) -> list[list[str]]:
        """The devices of each wave: a stable shuffle (by ``salt``, the rollout id) cut at the wave sizes
        (cumulative; at least one device in a wave while any are left); explicit ``device:`` lists first."""
        order = sorted(devices, key=lambda d: hashlib.sha256(f"{salt}/{d}".encode()).hexdigest())
        steps = {"all": ["100%"], "canary": [self.canary, "100%"], "waves": list(self.waves)}[self.strategy]
        if steps[-1] != "100%":
            steps.append("100%")  # whatever the waves say, a rollout that passes covers its target
        waves: list[list[str]] = []
        done: list[str] = []
        for step in steps:
            if step.startswith("device:"):
                named = step.removeprefix("device:").split(",")
                unknown = [d for d in named if d not in order]
                if unknown:  # a typo must never turn a canary into the whole fleet
                    raise SpecError(f"{step}: {', '.join(unknown)} not in the target; see 'cloud-hub devices list'")
                chosen = [d for d in named if d not in done]
            else:
                chosen = [d for d in order if d not in done][: max(_size(step, len(order)) - len(done), 0)]
                if not chosen and len(done) < len(order):
                    chosen = [d for d in order if d not in done][:1]
            if chosen:
                waves.append(chosen)
                done += chosen
        return waves


def _size(step: str, total: int) -> int:
    """Devices a wave size means, cumulatively: ``5%`` of ``total`` (rounded up) or a count ``N``."""
    try:
        if step.endswith("%"):
            percent = float(step[:-1])
            if not 0 < percent <= 100:
                raise ValueError
            return math.ceil(total * percent / 100)
        count = int(step)
        if count < 1:
            raise ValueError
        return count
    except ValueError:
        raise SpecError(f"wave size {step!r}: write a percentage (5%), a device count (3) or "
                        "device:ID,ID") from None  # fmt: skip
