"""What runs where: deployments, signed rollbacks, rollouts in waves and A/B tests."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Path

from cloud_hub.api import bodies
from cloud_hub.api.routing import route
from cloud_hub.auth import ACTOR, DEPLOYER, VIEWER
from cloud_hub.errors import NotFound

if TYPE_CHECKING:
    from cloud_hub.admin import AdminApi

ROLLOUT_ACTIONS = ("pause", "resume", "abort", "rollback")
AB_ACTIONS = ("promote", "stop")
# documented as enums; an unknown action answers 404 naming the known ones (as it always has)
RolloutAction = Annotated[str, Path(json_schema_extra={"enum": list(ROLLOUT_ACTIONS)})]
AbAction = Annotated[str, Path(json_schema_extra={"enum": list(AB_ACTIONS)})]


def add(routes: APIRouter, api: AdminApi) -> None:
    """Add this area's routes to ``routes`` (the app's router)."""
    hub = api.hub

    @route(routes, "GET", "/v1/deployments", VIEWER, summary="Deployments, newest first")
    def deployments() -> Any:
        return hub.registry.deployments()

    @route(routes, "GET", "/v1/deployments/{id}", VIEWER, summary="A deployment and each device's state")
    def deployment(id: str) -> Any:
        return hub.deployment(id)

    @route(routes, "POST", "/v1/deployments", DEPLOYER, summary="Deploy a model version")
    def deploy(body: bodies.Deploy) -> Any:
        return hub.deploy(body.model, body.version, body.target)

    @route(routes, "POST", "/v1/rollbacks", DEPLOYER,
           summary="Roll a target back to a model version: a deployment whose hub-signed desired states let "
                   "devices go below their installed release (docs/security.md)")  # fmt: skip
    def rollback(body: bodies.Deploy) -> Any:
        return hub.rollback(body.model, body.version, body.target)

    @route(routes, "GET", "/v1/rollouts", VIEWER, summary="Rollouts, newest first")
    def rollouts() -> Any:
        return hub.rollouts.list()

    @route(routes, "POST", "/v1/rollouts", DEPLOYER,
           summary="Start a rollout: waves with health gates (docs/rollouts.md)")  # fmt: skip
    def rollout_start(body: bodies.Rollout) -> Any:
        return hub.rollouts.create(body.request())

    @route(routes, "GET", "/v1/rollouts/{id}", VIEWER, summary="One rollout: waves, gate verdicts, events")
    def rollout(id: str) -> Any:
        return hub.rollouts.get(id)

    @route(routes, "POST", "/v1/rollouts/{id}/{action}", DEPLOYER,
           summary="pause, resume, abort or rollback a rollout (409 when its state does not allow it)")  # fmt: skip
    def rollout_action(id: str, action: RolloutAction) -> Any:
        engine = hub.rollouts
        actions = {"pause": engine.pause, "resume": engine.resume, "abort": engine.abort, "rollback": engine.rollback}
        if action not in actions:
            raise NotFound(f"no rollout action {action!r}: use {', '.join(actions)}")
        result = actions[action](id)
        hub.registry.audit(ACTOR.get(), f"rollout.{action}", {"rollout": id})
        return result

    @route(routes, "GET", "/v1/ab", VIEWER, summary="A/B tests, newest first (docs/ab.md)")
    def ab_tests() -> Any:
        return hub.ab.tests()

    @route(routes, "POST", "/v1/ab", DEPLOYER,
           summary="Start an A/B test: B beside A on the target's devices, split percent of calls to B (409 when "
                   "A and B differ in interface, naming the difference)")  # fmt: skip
    def ab_start(body: bodies.AbStart) -> Any:
        return hub.ab.start(body.model, body.a, body.b, body.split, body.target)

    @route(routes, "GET", "/v1/ab/{id}", VIEWER,
           summary="One A/B test with per-version figures, 95% intervals, B - A differences, the observed split "
                   "and a verdict")  # fmt: skip
    def ab_test(id: str) -> Any:
        return hub.ab.status(id)

    @route(routes, "POST", "/v1/ab/{id}/{action}", DEPLOYER,
           summary="promote (B everywhere the test ran) or stop (A alone) an A/B test (409 when it is not "
                   "running)")  # fmt: skip
    def ab_action(id: str, action: AbAction) -> Any:
        actions = {"promote": hub.ab.promote, "stop": hub.ab.stop}
        if action not in actions:
            raise NotFound(f"no A/B action {action!r}: use {', '.join(actions)}")
        return actions[action](id)
