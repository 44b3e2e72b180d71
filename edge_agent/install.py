"""The agent's installs: fetch a desired model's artifact, verify and health-check it, activate it, and
finish after a crash what an install left half done (``Installer.resume``).

``Installer`` is a mixin of ``Agent`` (``agent.py``), which owns the state it works on (store, journal,
transfers, the reported models). Every step is journaled (``InstallJournal``) and idempotent, so an agent
killed anywhere converges on restart: to the new version active, or a reported failure with the previous
version serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from device_profiles import DeviceProfile
from edge_agent.ab_agent import AbFollower
from edge_agent.active_watch import ActiveWatch
from edge_agent.journal import InstallJournal
from edge_agent.mqtt import MqttConnection
from edge_agent.protocol.artifact import check_freshness
from edge_agent.protocol.errors import ArtifactRejected
from edge_agent.protocol.manifest import Manifest, manifest_from_wire
from edge_agent.protocol.messages import Chunk, DesiredModel, FetchRequest, ReportedModel, short_error, to_wire
from edge_agent.protocol.signing import TrustStore, verify_document
from edge_agent.protocol.topics import Topics
from edge_agent.runtimes import open_runtime, zero_inputs
from edge_agent.store import ModelStore, check_compatible, kill_point
from edge_agent.transfer import Transfer

log = logging.getLogger("edge_agent.agent")  # the daemon's log, as before the split


def health_check(directory: Path, manifest: Manifest, profile: DeviceProfile) -> None:
    """Load the runtime, warm it with one zero input shaped like the signature (dynamic axes = 1), then
    check the artifact's golden samples (``edge_agent.golden``; raises GoldenSamplesFailed, an
    ArtifactRejected); an artifact without golden samples passes on finite zero-input outputs."""
    from edge_agent.golden import check_golden  # here: health_check is the golden check's only caller

    runtime = open_runtime(directory, manifest, profile)
    outputs = runtime.run(zero_inputs(manifest.inputs))
    if not all(np.all(np.isfinite(v)) for v in outputs.values() if v.dtype.kind == "f"):
        raise RuntimeError("health check produced non-finite outputs")
    check_golden(directory, manifest, runtime)


class Installer:
    """Fetching, checking and activating the models of the desired state: the ``Agent``'s install steps."""

    state_dir: Path
    profile: DeviceProfile
    store: ModelStore
    trust: TrustStore
    topics: Topics
    device_id: str
    mqtt: MqttConnection
    transfers: dict[str, tuple[DesiredModel, Transfer, float]]
    reported: dict[str, ReportedModel]
    installs: int
    journal: InstallJournal
    watch: ActiveWatch
    ab: AbFollower

    if TYPE_CHECKING:  # the Agent's own

        def _enqueue(self, handler: Callable[[str, bytes], None]) -> Callable[[str, bytes], None]: ...

        def _publish_reported(self) -> None: ...

    def _converge(self, model: DesiredModel) -> None:
        active = self.store.active(model.name)
        if active is not None and active.artifact_id == model.artifact_id:
            self.reported[model.name] = ReportedModel(model.name, "active", active.version, active.artifact_id)
            self.journal.discard(model.name)  # whatever was in flight for it, this is now settled
            return
        if model.artifact_id in self.transfers or self._activate_installed(
            model.name, model.version, model.artifact_id, model.rollback
        ):
            return
        try:
            manifest = self._check_offer(model)
        except ArtifactRejected as exc:
            log.warning("refused %s@%s: %s", model.name, model.version, exc)
            self._report_failed(model.name, model.version, model.artifact_id, str(exc))
            return
        transfer = Transfer(self.state_dir / "downloads", manifest, model.manifest, model.signature)
        self.transfers[model.artifact_id] = (model, transfer, time.monotonic())
        self.reported[model.name] = ReportedModel(model.name, "downloading", model.version, model.artifact_id)
        self.journal.record(model.name, model.version, model.artifact_id, "fetching")
        self.mqtt.route(self.topics.chunks(model.artifact_id), self._enqueue(self._on_chunk))
        log.info(
            "fetching %s@%s: %d of %d chunks missing",
            model.name,
            model.version,
            len(transfer.missing),
            len(transfer.wanted),
        )
        if transfer.complete:
            self._finish(model.artifact_id)
        else:
            self._request_missing(model.artifact_id)

    def _activate_installed(self, name: str, version: str, artifact_id: str, rollback: bool = False) -> bool:
        """The desired artifact is already installed above the active release (an install killed before
        its activation), or at any release for a signed ``rollback``: verify it, health-check it and
        activate it, with no fetch and no refusal of the agent's own install as a downgrade. False when it
        is not (fetch and check as usual)."""
        check = self._checker(name, version, artifact_id)
        try:
            if not self.store.activate_installed(artifact_id, name, check, allow_release_below=rollback):
                return False
        except Exception as exc:
            log.warning("activating installed %s@%s failed: %s", name, version, exc)
            self._outcome(name, version, artifact_id, str(exc))
            return True
        finally:
            self._own_switch(name, artifact_id)
        log.info("activated installed %s@%s", name, version)
        self._outcome(name, version, artifact_id)
        return True

    def _checker(self, name: str, version: str, artifact_id: str) -> Callable[[Path, Manifest], None]:
        """The health check, journaled: ``installed`` before it runs, ``checked`` once it passed."""

        def check(directory: Path, manifest: Manifest) -> None:
            self.journal.record(name, version, artifact_id, "installed")
            health_check(directory, manifest, self.profile)
            self.journal.record(name, version, artifact_id, "checked")

        return check

    def _outcome(self, name: str, version: str, artifact_id: str, error: str | None = None) -> None:
        """Journal and report how an install ended: active, or failed with ``error``."""
        self.journal.record(name, version, artifact_id, "activated" if error is None else "failed", error)
        if error is None:
            self.reported[name] = ReportedModel(name, "active", version, artifact_id)
        else:
            self._report_failed(name, version, artifact_id, error)

    def _report_failed(self, name: str, version: str, artifact_id: str, error: str) -> None:
        self.reported[name] = ReportedModel(name, "failed", version, artifact_id, short_error(error))

    def resume(self) -> None:
        """Finish what a crash interrupted, before any message arrives (the broker may be down): an
        install that reached the store is verified, checked and activated; outcomes are re-reported."""
        for entry in self.journal.entries():
            name, version, artifact_id = entry["name"], entry["version"], entry["artifact_id"]
            active = self.store.active(name)
            if active is not None and active.artifact_id == artifact_id:
                self.reported[name] = ReportedModel(name, "active", version, artifact_id)
            elif entry["step"] == "failed":
                self._report_failed(name, version, artifact_id, entry.get("error") or "failed")
            elif entry["step"] == "activated":  # switched away since (a rollback): nothing left to finish
                self.journal.discard(name)
            elif not self._activate_installed(name, version, artifact_id):
                log.info("resuming %s@%s from %s when the desired state arrives", name, version, entry["step"])

    def _check_offer(self, model: DesiredModel) -> Manifest:
        """Everything that can be checked before a single chunk is fetched."""
        verify_document(model.manifest, model.signature, self.trust)
        manifest = manifest_from_wire(model.manifest)
        if manifest.artifact_id != model.artifact_id:
            raise ArtifactRejected("manifest", "artifact id does not match the manifest")
        check_compatible(manifest, self.profile)
        installed = max((m.release for m in self.store.versions(manifest.name)), default=None)
        check_freshness(manifest, None if model.rollback else installed)  # rollback: signed by the hub (guard)
        if manifest.total_size > self.profile.max_artifact_bytes:
            raise ArtifactRejected("too-large", f"{manifest.total_size} bytes is over {self.profile.id}'s limit")
        return manifest

    def _request_missing(self, artifact_id: str) -> None:
        if artifact_id not in self.transfers:
            return
        model, transfer, _ = self.transfers[artifact_id]
        missing = transfer.missing
        chunks = () if len(missing) == len(transfer.wanted) else tuple(missing)
        self.mqtt.publish(self.topics.fetch(self.device_id), to_wire(FetchRequest(artifact_id, chunks)))
        self.transfers[artifact_id] = (model, transfer, time.monotonic())

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        artifact_id = self.topics.chunk_artifact(topic)
        if artifact_id not in self.transfers:
            return
        model, transfer, _ = self.transfers[artifact_id]
        chunk = Chunk.from_wire(payload)
        try:
            transfer.add(chunk.file_index, chunk.chunk_index, chunk.data)
        except ArtifactRejected as exc:
            log.warning("bad chunk for %s: %s (will fetch again)", artifact_id[:12], exc)
            return
        self.transfers[artifact_id] = (model, transfer, time.monotonic())
        if transfer.complete:
            self._finish(artifact_id)

    def _finish(self, artifact_id: str) -> None:
        model, transfer, _ = self.transfers.pop(artifact_id)
        self.mqtt.unroute(self.topics.chunks(artifact_id))
        if artifact_id in self.ab.fetching:  # the B side of an A/B test: installed beside A, never activated
            self.ab.finish(artifact_id, transfer, allow_release_below=model.rollback)
            self._publish_reported()
            transfer.discard()
            return
        try:
            self.journal.record(model.name, model.version, artifact_id, "downloaded")
            kill_point("downloaded")
            source = transfer.assemble()
            kill_point("assembled")
            check = self._checker(model.name, model.version, artifact_id)
            try:
                manifest = self.store.install(source, self.trust, self.profile, activate=True, check=check,
                                              allow_release_below=model.rollback)  # fmt: skip
            finally:
                self._own_switch(model.name, artifact_id)
            self.installs += 1
            log.info("activated %s@%s", manifest.name, manifest.version)
            self._outcome(model.name, model.version, artifact_id)
        except Exception as exc:
            log.warning("install of %s@%s failed: %s", model.name, model.version, exc)
            self._outcome(model.name, model.version, artifact_id, str(exc))
        self._publish_reported()
        kill_point("reported")
        transfer.discard()

    def _own_switch(self, name: str, artifact_id: str) -> None:
        """Right after the daemon switched (or tried to switch) ``name`` to ``artifact_id`` under the store's
        writer lock: a pointer now at it is the daemon's own switch, not a local one."""
        try:
            record = self.store.active(name)
        except (OSError, ValueError, TypeError):
            return
        if record is not None and record.artifact_id == artifact_id:
            self.watch.mark_seen(name)
