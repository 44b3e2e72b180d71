"""Which variant a profile gets: runtime by runtime in the profile's order, build each candidate (once
per compile, shared by the profiles), gate it against the fp32 reference, time it, and choose the
fastest that passed. When no variant of a runtime can be built or passes, fall back to the profile's
next runtime and say why (Raspberry Pi: LiteRT, then ONNX Runtime)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_profiles import DeviceProfile
from model_compiler.data import Feeds
from model_compiler.errors import CompileError, GateFailed, SourceError
from model_compiler.tflite import TFLITE_KINDS, export_tflite, latency_tflite_ms, predict_tflite, quantize_tflite
from model_compiler.variants import (
    DYNAMIC_LADDER,
    INT8_LADDER,
    Variant,
    build,
    gate,
    median_latency_ms,
    precision_of,
    predict,
    sensitive_nodes,
)

NOTE_CHARS = 600  # how much of a build error an attempt keeps


class BuildFailed(Exception):
    """A variant could not be built (conversion, quantization, or running it failed)."""


@dataclass(frozen=True)
class Choice:
    runtime: str
    variant: Variant
    reason: str
    attempts: list[dict[str, Any]]
    fallbacks: list[str]  # why earlier runtimes of the profile were passed over


@dataclass
class Workspace:
    """Everything a variant needs, shared by the profiles of one compile, and the variants built so far."""

    source: str
    fp32: Path
    work: Path
    calib: Feeds
    val: Feeds
    reference: np.ndarray
    metric: str
    tolerance: float
    sample: Feeds
    progress: Callable[[str], None] = lambda _: None
    labels: Any = None  # the validation labels, when given (golden samples cover several classes)
    built: dict[str, Variant] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)  # kind (or "tflite-export") → why it failed

    def variant(self, kind: str) -> Variant:
        """The gated, timed ``kind`` variant; raises BuildFailed with the real error."""
        if kind in self.broken:
            raise BuildFailed(self.broken[kind])
        if kind not in self.built:
            try:
                self.built[kind] = self._build(kind)
            except Exception as exc:
                self.broken[kind] = f"{type(exc).__name__}: {exc}"
                raise BuildFailed(self.broken[kind]) from exc
        return self.built[kind]

    def _build(self, kind: str) -> Variant:
        self.progress(f"building and validating {kind}")
        if kind in TFLITE_KINDS:
            return self._tflite(kind)
        exclude = None
        if kind == "int8-dynamic-excluding-sensitive":
            self.progress("measuring which layers are most sensitive to int8")
            exclude = sensitive_nodes(self.fp32, self.work, self.val, self.reference, self.metric, self.tolerance)
        path = build(kind, self.fp32, self.work / f"{kind}.onnx", self.calib, exclude)
        result = gate(self.metric, self.tolerance, self.reference, predict(path, self.val))
        return Variant(kind, path, path.stat().st_size, result, median_latency_ms(path, self.sample))

    def _tflite(self, kind: str) -> Variant:
        path = self._tflite_fp32()
        if kind == "tflite-int8":
            path = self.work / "tflite-int8.tflite"
            quantize_tflite(self.work / "tflite-fp32.tflite", path)
        result = gate(self.metric, self.tolerance, self.reference, predict_tflite(path, self.val))
        return Variant(kind, path, path.stat().st_size, result, latency_tflite_ms(path, self.sample))

    def _tflite_fp32(self) -> Path:
        """The LiteRT conversion, once: its error is every TFLite variant's error."""
        path = self.work / "tflite-fp32.tflite"
        if "tflite-export" in self.broken:
            raise SourceError(self.broken["tflite-export"])
        if not path.exists():
            try:
                export_tflite(self.source, self.calib, path)
            except Exception as exc:
                self.broken["tflite-export"] = str(exc)
                raise
        return path


def _family(runtime: str) -> str | None:
    if runtime == "tflite":
        return "tflite"
    return "onnx" if runtime == "tensorrt" or runtime.startswith("onnxruntime") else None


def runtime_plan(profile: DeviceProfile) -> list[str]:
    """The runtimes to try, in the profile's order: its first LiteRT and its first ONNX-based runtime
    (ONNX Runtime and TensorRT take the same ONNX variants, so one of them is enough)."""
    plan: list[str] = []
    for runtime in profile.runtimes:
        family = _family(runtime)
        if family and family not in {_family(r) for r in plan}:
            plan.append(runtime)
    if not plan:
        raise CompileError(f"profile {profile.id} lists no runtime this compiler emits for: {list(profile.runtimes)}")
    return plan


def candidates(runtime: str, profile: DeviceProfile) -> list[str]:
    """Variant kinds a runtime of the profile may run, the int8 back-off ladders first."""
    if runtime == "tflite":
        return [*(["tflite-int8"] if "int8" in profile.precisions else []), "tflite-fp32"]
    kinds: list[str] = []
    if "int8" in profile.precisions:
        kinds += [*INT8_LADDER, *DYNAMIC_LADDER]
    if "fp16" in profile.precisions:
        kinds.append("fp16")
    return [*kinds, "fp32"]


def choose(profile: DeviceProfile, workspace: Workspace) -> Choice:
    """The fastest variant that passed its gate on the first runtime of the profile that has one;
    raises GateFailed listing every attempt's real outcome when no runtime has one."""
    plan = runtime_plan(profile)
    attempts: list[dict[str, Any]] = []
    fallbacks: list[str] = []
    for runtime, after in zip(plan, [*plan[1:], None], strict=True):
        variants, tried = _ladder(runtime, profile, workspace)
        attempts += tried
        passed = [v for v in variants if v.gate.passed]
        if passed:
            best = min(passed, key=lambda v: v.latency_ms)
            return Choice(runtime, best, "; ".join([*fallbacks, _why(best, variants)]), attempts, fallbacks)
        why = _why_not(runtime, tried)
        fallbacks.append(f"{why}; fell back to {after}" if after else why)
    raise GateFailed(_failure(profile, plan, attempts), attempts)


def _ladder(runtime: str, profile: DeviceProfile, workspace: Workspace) -> tuple[list[Variant], list[dict[str, Any]]]:
    """Build and gate a runtime's candidates; a step of an int8 ladder is tried only when the more
    aggressive ones failed their gate."""
    variants, attempts = [], []
    passed_ladders: set[tuple[str, ...]] = set()
    for kind in candidates(runtime, profile):
        ladder = INT8_LADDER if kind in INT8_LADDER else DYNAMIC_LADDER if kind in DYNAMIC_LADDER else ()
        if ladder in passed_ladders:
            continue
        try:
            variant = workspace.variant(kind)
        except BuildFailed as exc:  # a variant that cannot be built is an attempt that failed
            attempts.append({"kind": kind, "precision": precision_of(kind), "runtime": runtime, "passed": False,
                             "note": f"could not be built: {exc}"[:NOTE_CHARS]})  # fmt: skip
            continue
        variants.append(variant)
        if ladder and variant.gate.passed:
            passed_ladders.add(ladder)
        note = "" if variant.gate.passed else "failed the gate: backing off" if ladder else "failed the gate"
        attempts.append(_attempt(variant, runtime, note))
    return variants, attempts


def _attempt(variant: Variant, runtime: str, note: str) -> dict[str, Any]:
    return {"kind": variant.kind, "precision": variant.precision, "runtime": runtime, **asdict(variant.gate),
            "size": variant.size, "latency_ms": round(variant.latency_ms, 4), "note": note}  # fmt: skip


def _why(best: Variant, variants: list[Variant]) -> str:
    fp32 = next((v for v in variants if v.kind.endswith("fp32")), None)
    versus = f" vs fp32 {fp32.latency_ms:.3f} ms" if fp32 and fp32 is not best else ""
    return f"{best.kind}: fastest passing variant ({best.latency_ms:.3f} ms{versus})"


def _why_not(runtime: str, tried: list[dict[str, Any]]) -> str:
    """Why a runtime got no variant: the real build error, or each variant's gate value."""
    gated = [a for a in tried if "metric" in a]
    if not gated:
        errors = list(dict.fromkeys(a["note"].removeprefix("could not be built: ") for a in tried))
        return f"{runtime}: no variant could be built ({'; '.join(errors)})"
    values = ", ".join(f"{a['kind']} {a['metric']} {a['value']:.4f}" for a in gated)
    return f"{runtime}: no variant passed the gate ({values})"


def _failure(profile: DeviceProfile, plan: list[str], attempts: list[dict[str, Any]]) -> str:
    lines = [
        f"{a['kind']} ({a['runtime']}): {a['note']}" if "metric" not in a else
        f"{a['kind']} ({a['runtime']}): failed the gate, {a['metric']} {a['value']:.4f} at tolerance {a['tolerance']}"
        for a in attempts
    ]  # fmt: skip
    return (f"no variant passed on any runtime {profile.id} lists ({', '.join(plan)}): {'; '.join(lines)}. "
            "Fix the errors above, or check the metric and tolerance")  # fmt: skip
