"""EdgeClient: the SDK edge apps call. Local inference first, cloud when no local model can answer.

The hot path does a dict lookup, a clock read, input validation compiled per model, the runtime call
and one deque append for telemetry. The active pointer is stat()-ed at most every 5 ms per model; a
new version is loaded and warmed in a background thread and swapped in atomically, while calls in
flight finish on the session they started with.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from device_profiles import DeviceProfile, get_profile
from edge_agent.ab import Key
from edge_agent.cache import PredictionCache
from edge_agent.cloud import CloudClient
from edge_agent.cloud_interfaces import CloudInterfaces
from edge_agent.config import STATE_DIR_ENV, AgentConfig, default_state_dir
from edge_agent.errors import (
    CloudThrottled,
    CloudUnavailable,
    ConfigError,
    InferenceFailed,
    InputMismatch,
    ModelNotDeployed,
)
from edge_agent.example_spool import ExampleSpool, spool_dir
from edge_agent.examples import ExampleKeeper, HardExamples
from edge_agent.hotswap import ActiveModels, Loaded
from edge_agent.protocol.manifest import Interface
from edge_agent.routing import POLICIES, CircuitBreaker, Confidence, RateBudget, confidence
from edge_agent.store import ModelStore
from edge_agent.telemetry import SPOOL_FILE, Spool, TelemetryRecorder

log = logging.getLogger(__name__)
Inputs = dict[str, np.ndarray]


@dataclass(slots=True)  # not frozen: a frozen dataclass costs ≈ 0.9 µs more to build, on every call
class InferResult:
    outputs: dict[str, np.ndarray]
    model: str
    version: str
    route: str  # "local" or "cloud"
    latency_ms: float
    reason: str = ""  # why this route answered
    cached: bool = False


@dataclass(frozen=True)
class ModelInfo:
    name: str
    active_version: str | None
    versions: tuple[str, ...]
    interface: Interface | None = None  # what the model takes and returns, the same on every route


class EdgeClient:
    """Thread-safe in-process inference over the device's model store.

    ``EdgeClient()`` reads the state directory the agent wrote (``EDGEFED_STATE_DIR`` or the default);
    ``cloud`` overrides the agent's cloud endpoint (``grpc://host:port``) and ``cloud=False`` disables it.
    ``cache_size`` > 0 enables an LRU prediction cache keyed by the input bytes and the model version.
    ``hard_examples=HardExamples(...)`` opts in to keeping samples for retraining (``keep_example`` and
    an optional low-confidence policy; docs/sdk.md, "Hard examples"): off by default, nothing is kept.
    """

    def __init__(
        self,
        state_dir: str | Path | None = None,
        *,
        cloud: str | bool | None = None,
        cloud_timeout_s: float = 2.0,
        telemetry: bool = True,
        allow_cast: bool = False,
        cache_size: int = 0,
        policy: str = "local_first",
        latency_budget_ms: float | None = None,
        cascade_threshold: float = 0.6,
        cascade_model: str | None = None,
        confidence_measure: Confidence = "max_softmax",
        cloud_budget_per_minute: float | None = None,
        cloud_retries: int = 2,
        hard_examples: HardExamples | None = None,
    ) -> None:
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        if not self.state_dir.is_dir():
            raise ConfigError(
                f"state directory {self.state_dir} does not exist: pass the directory 'edge-agent init --state-dir' "
                f"wrote, or set {STATE_DIR_ENV}"
            )
        config = self._config()
        self.profile: DeviceProfile | None = get_profile(config.profile) if config else None
        self.store = ModelStore(self.state_dir / "models")
        self.allow_cast = allow_cast
        if policy not in POLICIES:
            raise ConfigError(f"policy: {policy!r} is not one of {', '.join(POLICIES)}")
        endpoint = cloud if isinstance(cloud, str) else (config.cloud if config and cloud is not False else None)
        if endpoint is None and policy in ("cloud_only", "cloud_first", "cascade"):
            raise ConfigError(
                f"policy {policy} needs a cloud endpoint: pass cloud='grpc://host:port' or set it in agent.json"
            )
        self._cloud = (
            CloudClient(
                endpoint, cloud_timeout_s, device_id=config.device_id if config else None,
                token=config.cloud_token if config else None, ca_file=config.cloud_ca if config else None,
            )
            if endpoint
            else None
        )  # fmt: skip
        self.policy = policy
        budget_ms = latency_budget_ms or (self.profile.latency_budget_ms if self.profile else 50.0)
        self.latency_budget_s = budget_ms / 1000
        self.cascade_threshold, self.cascade_model = cascade_threshold, cascade_model
        self.confidence_measure: Confidence = confidence_measure
        self.cloud_timeout_s, self.cloud_retries = cloud_timeout_s, cloud_retries
        self.cloud_breaker = CircuitBreaker(failure_threshold=3, reset_timeout_s=1.0)
        self._local_breakers: dict[str, CircuitBreaker] = {}
        self._budget = RateBudget(cloud_budget_per_minute) if cloud_budget_per_minute else None
        self._recorder = TelemetryRecorder(Spool(self.state_dir / SPOOL_FILE)) if telemetry else None
        self._active = ActiveModels(self.store, self.profile, self.state_dir / "engines")
        self._splits = self._active.splits.by_model  # A/B tests (ab.py), read on every call
        self._interfaces = CloudInterfaces(self._cloud, self.cloud_breaker, cloud_timeout_s) if self._cloud else None
        self.budget_breaches = 0  # local calls over the latency budget (also counted in telemetry)
        self._breaches_lock = threading.Lock()
        self._cache = PredictionCache(cache_size) if cache_size > 0 else None
        self._examples = (ExampleKeeper(ExampleSpool(spool_dir(self.state_dir)), hard_examples,
                                        config.device_id if config else "") if hard_examples else None)  # fmt: skip
        self._watch = self._examples if hard_examples and hard_examples.low_confidence_below is not None else None

    def _config(self) -> AgentConfig | None:
        try:
            return AgentConfig.load(self.state_dir)
        except ConfigError:
            if (self.state_dir / "agent.json").exists():
                raise
            return None

    # inference ---------------------------------------------------------------------------------
    def infer(self, model: str, inputs: Inputs | np.ndarray, key: Key | None = None) -> InferResult:
        """Answer with the route the policy picks; the result says which route answered and why.

        While an A/B test of ``model`` runs on the device (docs/ab.md), ``key`` (a user or session id)
        picks its version, the same one on every call; without a key the version is picked at random.

        Inputs are checked against the model version's interface before either route is tried, and
        the outputs carry the interface's names whichever route answered. Loading a model (the first
        call, in this process) is not part of ``latency_ms`` nor of the latency budget.
        """
        loaded = self._active.get(model)
        split = self._splits.get(model)  # an A/B test: the one lookup a model without a test costs
        if split is not None:
            loaded = split.pick(loaded, key)
        start = time.perf_counter()
        if type(inputs) is not dict:
            inputs = self._single_input(model, inputs, loaded)  # type: ignore[arg-type]
        inputs = self._checked(model, inputs, loaded, start)  # type: ignore[arg-type]
        policy = self.policy
        if policy == "cloud_only":
            return self._cloud_infer(model, inputs, start, "policy cloud_only", self._version(loaded))
        reason = ""
        if policy == "cloud_first":
            try:
                return self._cloud_infer(model, inputs, start, "policy cloud_first", self._version(loaded))
            except (CloudUnavailable, ModelNotDeployed) as exc:  # (the cloud may lack the version active here)
                if loaded is None:
                    raise
                reason = f"cloud failed ({exc}); "
        if loaded is None:
            if self._cloud is None or policy == "local_only":
                why = "the policy is local_only" if self._cloud else "no cloud endpoint is set"
                raise ModelNotDeployed(f"{model} is not installed in {self.state_dir} and {why}")  # fmt: skip
            return self._cloud_infer(model, inputs, start, "no local version", "")
        return self._local_infer(model, inputs, loaded, start, reason)

    @staticmethod
    def _version(loaded: Loaded | None) -> str:
        """The version a cloud call asks for: the one active here, so both routes answer alike."""
        return loaded.record.version if loaded is not None else ""

    def _checked(self, model: str, inputs: Inputs, loaded: Loaded | None, start: float) -> Inputs:
        """Inputs checked (and cast, with ``allow_cast``) against the interface: the local version's,
        else the cloud's (cloud_interfaces.py); a caller's mistake never reaches a route."""
        if loaded is not None:
            try:
                return loaded.validator(inputs, self.allow_cast)
            except InputMismatch:
                self._record(model, loaded.record.version, "local", start, False)
                raise
        if self._interfaces is None or self.policy == "local_only":
            return inputs
        validator = self._interfaces.validator(model)
        return validator(inputs, self.allow_cast) if validator is not None else inputs

    def _output_names(self, model: str) -> tuple[str, ...] | None:
        loaded = self._active.loaded(model)
        if loaded is not None:
            return tuple(s.name for s in loaded.runtime.manifest.outputs)
        known = self._interfaces.cached(model) if self._interfaces else None
        return tuple(s.name for s in known.outputs) if known else None

    def _local_infer(self, model: str, checked: Inputs, loaded: Loaded, start: float, reason: str) -> InferResult:
        version = loaded.record.version
        breaker = self._local_breakers.get(model) or self._local_breakers.setdefault(model, CircuitBreaker(3, 5.0))
        can_fall_back = self._cloud is not None and self.policy in ("local_first", "cascade")
        if can_fall_back and not breaker.allow():
            return self._cloud_infer(model, checked, start, "local breaker open (recent runtime errors)", version)
        if self._cache is not None:
            hit = self._cache.get(model, version, checked)
            if hit is not None:
                latency_ms = self._record(model, version, "cache", start, True)
                return InferResult(hit, model, version, "local", latency_ms, "prediction cache hit", cached=True)
        try:
            outputs = loaded.runtime.run(checked)
        except InputMismatch:  # the caller's data (e.g. ids beyond int32): not a runtime failure
            self._record(model, version, "local", start, False)
            raise
        except Exception as exc:
            breaker.failure()
            self._record(model, version, "local", start, False)
            if not can_fall_back and self.policy != "cloud_first":
                raise InferenceFailed(f"{model}@{version}: {exc}") from exc
            if not can_fall_back:
                raise InferenceFailed(f"{model}@{version}: {exc} ({reason.strip('; ')})") from exc
            return self._cloud_infer(model, checked, start, f"local runtime failed: {exc}", version)
        breaker.success()
        elapsed = time.perf_counter() - start
        over_budget = elapsed > self.latency_budget_s
        if over_budget:  # reported (telemetry, status), never a reason to leave the local route
            with self._breaches_lock:
                self.budget_breaches += 1
            reason += f"over the {self.latency_budget_s * 1000:g} ms budget; "
        if self.policy == "cascade":
            escalated = self._escalate(model, checked, outputs, start, version)
            if escalated is not None:
                return escalated
        latency_ms = elapsed * 1000
        if self._recorder is not None:
            self._recorder.record(model, version, "local", latency_ms, True, loaded.reference, checked, outputs,
                                  over_budget=over_budget)  # fmt: skip
        if self._watch is not None:  # the opt-in low-confidence policy: copy and enqueue
            self._watch.observe(model, version, checked, outputs)
        if self._cache is not None:
            self._cache.put(model, version, checked, outputs)
        return InferResult(outputs, model, version, "local", latency_ms, reason + "active locally")

    def _escalate(self, model: str, inputs: Inputs, outputs: dict[str, np.ndarray], start: float,
                  version: str) -> InferResult | None:  # fmt: skip
        """Cascade: ask the cloud when the local answer is not confident enough and time remains."""
        score = confidence(next(iter(outputs.values())), self.confidence_measure)
        if score >= self.cascade_threshold:
            return None
        remaining = self.latency_budget_s - (time.perf_counter() - start)
        if remaining <= 0.001:
            return None
        target = self.cascade_model or model
        why = f"{self.confidence_measure} {score:.2f} < {self.cascade_threshold}"
        try:
            return self._cloud_infer(target, inputs, start, why, "" if self.cascade_model else version, remaining)
        except (CloudUnavailable, ModelNotDeployed):
            return None

    def _cloud_infer(self, model: str, inputs: Inputs, start: float, reason: str, version: str,
                     deadline_s: float | None = None) -> InferResult:  # fmt: skip
        """One cloud answer within one overall deadline: breaker, budget, and retries only for calls the
        server never processed (unreachable, overloaded)."""
        if self._cloud is None:
            raise CloudUnavailable("no cloud endpoint is configured")
        deadline = start + (deadline_s if deadline_s is not None else self.cloud_timeout_s)
        names = self._output_names(model)
        for attempt in range(self.cloud_retries + 1):
            if not self.cloud_breaker.allow():
                self._record(model, version, "cloud", start, False)
                raise CloudUnavailable("cloud breaker open: the cloud failed recently; retrying after 1 s")
            if self._budget is not None and not self._budget.take():
                self._record(model, version, "throttled", start, False)
                raise CloudThrottled("cloud budget (calls per minute) spent for this device")
            remaining = deadline - time.perf_counter()
            try:
                answered, outputs = self._cloud.infer(model, inputs, version, max(remaining, 0.001), names)
            except CloudUnavailable as exc:
                self.cloud_breaker.failure()
                backoff = 0.01 * (2**attempt)
                if not exc.retryable or attempt == self.cloud_retries or deadline - time.perf_counter() < backoff:
                    self._record(model, version, "cloud", start, False)
                    raise
                time.sleep(backoff)
                continue
            except Exception:
                self.cloud_breaker.success()  # the server answered (e.g. unknown model): the route is healthy
                self._record(model, version, "cloud", start, False)
                raise
            self.cloud_breaker.success()
            latency_ms = self._record(model, answered, "cloud", start, True)
            return InferResult(outputs, model, answered, "cloud", latency_ms, reason)
        raise AssertionError("unreachable")

    def infer_batch(self, model: str, items: list[Inputs], key: Key | None = None) -> list[InferResult]:
        """Concatenate several inputs along axis 0, run once, and split the outputs back per item (one
        A/B version for the whole batch: ``key``'s, or one picked at random)."""
        if not items:
            return []
        names = list(items[0])
        joined = {n: np.concatenate([np.asarray(item[n]) for item in items]) for n in names}
        result = self.infer(model, joined, key)
        sizes = np.cumsum([len(np.asarray(item[names[0]])) for item in items])[:-1]
        parts = {n: np.split(v, sizes) for n, v in result.outputs.items()}
        return [
            InferResult({n: parts[n][i] for n in parts}, model, result.version, result.route, result.latency_ms,
                        result.reason, result.cached)
            for i in range(len(items))
        ]  # fmt: skip

    async def ainfer(self, model: str, inputs: Inputs | np.ndarray, key: Key | None = None) -> InferResult:
        """``infer`` for asyncio apps: runs in a worker thread, never blocks the event loop."""
        return await asyncio.to_thread(self.infer, model, inputs, key)

    def _single_input(self, model: str, array: np.ndarray, loaded: Loaded | None) -> Inputs:
        if loaded is None or len(loaded.runtime.manifest.inputs) != 1:
            raise InputMismatch("-", f"a dict of named inputs for {model}", "a bare array")
        return {loaded.runtime.manifest.inputs[0].name: array}

    def _record(self, model: str, version: str, route: str, start: float, ok: bool) -> float:
        latency_ms = (time.perf_counter() - start) * 1000
        if self._recorder is not None:
            self._recorder.record(model, version, route, latency_ms, ok)
        return latency_ms

    def keep_example(self, model: str, inputs: Inputs | np.ndarray, outputs: dict[str, np.ndarray] | None = None,
                     reason: str = "marked by the app", version: str | None = None) -> str | None:  # fmt: skip
        """Keep a sample for retraining (opt-in: ``hard_examples=HardExamples(...)``): its arrays are
        copied and written to the example spool off the caller's thread; the agent uploads it to the hub.
        Returns its id, or None when refused (over ``max_example_bytes``, queue full: counted).
        ``version`` defaults to the version active here."""
        if self._examples is None:
            raise ConfigError("hard examples are off for this client: pass EdgeClient(..., "
                              "hard_examples=HardExamples()) to keep samples for upload")  # fmt: skip
        active = self.store.active(model)
        if type(inputs) is not dict:  # a bare array: the one input of the version active here
            specs = self.store.manifest(model, active.version).inputs if active else ()
            if len(specs) != 1:
                raise InputMismatch("-", f"a dict of named inputs for {model}", "a bare array")
            inputs = {specs[0].name: inputs}  # type: ignore[dict-item]
        if version is None:
            version = active.version if active else ""
        return self._examples.keep(model, version, inputs, outputs, reason)  # type: ignore[arg-type]

    def example_counters(self) -> dict[str, int]:
        """The device's hard-example counters (every process's) and what waits in the spool."""
        if self._examples is None:
            return {}
        self._examples.flush()
        return self._examples.spool.status()

    # housekeeping ------------------------------------------------------------------------------
    def model_info(self, name: str) -> ModelInfo:
        """A model's versions here and its interface: the active local version's, else the cloud's."""
        active = self.store.active(name)
        versions = tuple(m.version for m in self.store.versions(name))
        interface = self.store.manifest(name, active.version).interface if active else None
        if interface is None and self._interfaces is not None:
            interface = self._interfaces.interface(name)
        if interface is None:
            raise ModelNotDeployed(f"{name} is not installed in {self.state_dir} and no cloud describes it")
        return ModelInfo(name, active.version if active else None, versions, interface)

    def models(self) -> list[ModelInfo]:
        """Installed models with their active version."""
        infos = []
        for name in self.store.names():
            active = self.store.active(name)
            versions = tuple(m.version for m in self.store.versions(name))
            interface = self.store.manifest(name, active.version).interface if active else None
            infos.append(ModelInfo(name, active.version if active else None, versions, interface))
        return infos

    def close(self) -> None:
        self._active.close()
        if self._examples is not None:
            self._examples.close()
        if self._recorder is not None:
            self._recorder.close()
        if self._cloud is not None:
            self._cloud.close()

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
