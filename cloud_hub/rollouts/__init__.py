"""Rollouts: waves of a deployment with health gates, automatic rollback, resumed after a restart."""

from cloud_hub.rollouts.engine import RolloutEngine
from cloud_hub.rollouts.spec import RolloutSpec, SpecError

__all__ = ["RolloutEngine", "RolloutSpec", "SpecError"]
