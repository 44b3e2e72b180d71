"""The admin API's request bodies: pydantic models, strict (a string is a string, a number a number, never
a bool), unknown fields ignored as before. A body that does not fit answers 400 naming the field
(``app.validation_error``), never FastAPI's 422."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cloud_hub.auth import ROLES
from cloud_hub.rollouts import spec

Text = Annotated[str, Field(strict=True)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]  # a finite JSON number (an int too)
Target = Annotated[str, Field(strict=True, description="device:ID, group:NAME or tag:KEY=VALUE")]


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class Deploy(Body):
    """A model version to a target (also the body of a rollback)."""

    model: Text
    version: Text
    target: Target


class Enroll(Body):
    token: Text
    device_id: Text
    profile: Text


class EnrollToken(Body):
    groups: list[Text] = []
    tags: dict[str, Text] = {}
    ttl_s: Number = 3600.0
    reenroll: Text | None = Field(default=None, description="an existing device id this token may re-enroll")


class AlertChange(Body):
    by: Text | None = Field(default=None, description="who acknowledges or resolves (default: the token's name)")


class AbStart(Body):
    model: Text
    a: Text
    b: Text
    split: Number = Field(default=50.0, description="the percent of calls for B, above 0 and below 100")
    target: Target


class Gates(Body):
    """docs/rollouts.md, "Health gates"; a field left out keeps its default."""

    model_config = ConfigDict(extra="forbid", strict=True)  # a misspelt gate is refused, not ignored

    min_calls: Number = spec.Gates.min_calls
    min_soak_s: Number = spec.Gates.min_soak_s
    max_error_rate: Number = spec.Gates.max_error_rate
    max_error_ratio: Number = spec.Gates.max_error_ratio
    max_p95_ratio: Number = spec.Gates.max_p95_ratio
    max_fallback_ratio: Number = spec.Gates.max_fallback_ratio
    max_breach_ratio: Number = spec.Gates.max_breach_ratio
    slack: Number = spec.Gates.slack
    latency_slack_ms: Number = spec.Gates.latency_slack_ms
    max_drift_score: Number | None = Field(default=spec.Gates.max_drift_score, description="null: not a gate")


class Abort(Body):
    failed_fraction: Number = spec.Abort.failed_fraction
    min_devices: int = spec.Abort.min_devices


class Rollout(Body):
    """docs/rollouts.md; a field left out keeps its default."""

    model: Text
    version: Text
    target: Target
    strategy: Literal["all", "canary", "waves"] = "waves"
    canary: Text = Field(default=spec.RolloutSpec.canary, description="the canary's size: 5%, 3 or device:ID,ID")
    waves: list[Text] = Field(default=list(spec.RolloutSpec.waves), description="sizes: 5%, 3 or device:ID,ID")
    pause_s: Number = spec.RolloutSpec.pause_s
    gates: Gates = Gates()
    abort: Abort = Abort()
    on_failure: Literal["rollback", "halt"] = "rollback"
    wave_timeout_s: Number = spec.RolloutSpec.wave_timeout_s

    def request(self) -> dict[str, Any]:
        """The rollout engine's request: the fields the caller gave."""
        return self.model_dump(exclude_unset=True)


class TokenCreate(Body):
    name: Text
    role: Annotated[str, Field(strict=True, description=f"one of {', '.join(ROLES)}")]


class PublicKey(Body):
    public_key: Text = Field(description="a PEM public key (model-compiler keygen's .pub)")
