"""The agent's side of A/B tests (docs/ab.md): install the B version a desired state names beside the
active (A) one, health-check it, and write ``ab.json`` so apps split their calls; remove the file when
the desired state no longer names a B.

B is fetched with the agent's transfers like any artifact and checked like one (signature, profile,
size, expiry; its release may be below the installed ones only inside a hub-signed desired state, as a
signed rollback may). It is installed without touching the active pointer, so A keeps serving every call
until B has passed its health check; a B that fails it is reported (``ReportedAB.state`` failed) and A
keeps every call. Promoting B is an ordinary desired state naming B as the model's version.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from edge_agent.ab import AbSpec, clear_ab, read_ab, write_ab
from edge_agent.protocol.errors import ArtifactRejected
from edge_agent.protocol.messages import DesiredAB, DesiredModel, ReportedAB, ReportedModel, short_error
from edge_agent.transfer import Transfer

if TYPE_CHECKING:
    from edge_agent.agent import Agent

log = logging.getLogger(__name__)


class AbFollower:
    """What the agent does for A/B tests; ``reported`` is each model's test as the device has it."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.reported: dict[str, ReportedAB] = {}
        self.fetching: dict[str, tuple[str, AbSpec]] = {}  # B artifact → (model, its test)

    def follow(self, models: Iterable[DesiredModel], signed: bool) -> None:
        """Set up, keep or end each model's test as the accepted desired state says."""
        for model in models:
            if model.ab is None:
                if clear_ab(self.agent.store, model.name):
                    log.info("%s: the A/B test ended; every call goes to the active version", model.name)
                self.reported.pop(model.name, None)
            else:
                self._start(model, model.ab, signed)

    def _start(self, model: DesiredModel, ab: DesiredAB, signed: bool) -> None:
        store, name = self.agent.store, model.name
        spec = AbSpec(ab.ab_id, model.version, ab.version, ab.artifact_id, ab.split)
        current = read_ab(store, name)
        if current is not None and current != spec:
            clear_ab(store, name)  # another test (or split): nothing goes to the old B meanwhile
        installed = next((m for m in store.versions(name) if m.artifact_id == ab.artifact_id), None)
        if installed is not None:
            if current == spec:
                self._report(name, spec, "active")
            else:
                self._check_and_write(name, spec)
            return
        if ab.artifact_id in self.agent.transfers:
            return
        offer = DesiredModel(name, ab.version, ab.artifact_id, ab.manifest, ab.signature, rollback=signed)
        try:
            manifest = self.agent._check_offer(offer)  # rollback=signed: a B below A's release is the hub's call
        except ArtifactRejected as exc:
            log.warning("refused %s@%s (B of A/B test %s): %s", name, ab.version, ab.ab_id, exc)
            self._report(name, spec, "failed", str(exc))
            return
        transfer = Transfer(self.agent.state_dir / "downloads", manifest, ab.manifest, ab.signature)
        self.fetching[ab.artifact_id] = (name, spec)
        self.agent.transfers[ab.artifact_id] = (offer, transfer, time.monotonic())
        self._report(name, spec, "downloading")
        self.agent.mqtt.route(self.agent.topics.chunks(ab.artifact_id), self.agent._enqueue(self.agent._on_chunk))
        log.info("fetching %s@%s, the B side of A/B test %s", name, ab.version, ab.ab_id)
        if transfer.complete:
            self.agent._finish(ab.artifact_id)
        else:
            self.agent._request_missing(ab.artifact_id)

    def finish(self, artifact_id: str, transfer: Transfer, allow_release_below: bool) -> None:
        """A fetched B: install it beside A (never active), check it, start the split."""
        name, spec = self.fetching.pop(artifact_id)
        agent = self.agent
        try:
            source = transfer.assemble()
            agent.store.install(source, agent.trust, agent.profile, allow_release_below=allow_release_below)
        except Exception as exc:
            log.warning("install of %s@%s (B of A/B test %s) failed: %s", name, spec.b, spec.ab_id, exc)
            self._report(name, spec, "failed", str(exc))
            return
        self._check_and_write(name, spec)

    def _check_and_write(self, name: str, spec: AbSpec) -> None:
        from edge_agent.agent import health_check  # (agent imports this module)

        store = self.agent.store
        try:
            with store.locked(shared=True):
                manifest = store.manifest(name, spec.b)
                if manifest.artifact_id != spec.b_artifact_id:
                    raise ArtifactRejected("manifest", f"{name}@{spec.b} is installed with other content")
                health_check(store.version_dir(name, spec.b), manifest, self.agent.profile)
        except Exception as exc:
            log.warning("%s@%s (B of A/B test %s) failed its health check: %s", name, spec.b, spec.ab_id, exc)
            self._report(name, spec, "failed", str(exc))
            return
        write_ab(store, name, spec)
        log.info("A/B test %s of %s: %g%% of calls to %s", spec.ab_id, name, spec.split, spec.b)
        self._report(name, spec, "active")

    def _report(self, name: str, spec: AbSpec, state: str, error: str | None = None) -> None:
        self.reported[name] = ReportedAB(
            spec.ab_id, spec.b, spec.b_artifact_id, spec.split, state, short_error(error) if error else None
        )

    def attach(self, model: ReportedModel) -> ReportedModel:
        """``model`` as reported, with its test (if any)."""
        ab = self.reported.get(model.name)
        return model if ab is None and model.ab is None else dataclasses.replace(model, ab=ab)
