"""compile_model: one source model → one signed, gated artifact per device profile."""

from __future__ import annotations

import hashlib
import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from device_profiles import DeviceProfile, get_profile
from edge_agent.protocol.artifact import seal
from edge_agent.protocol.atomic import atomic_write_bytes, publish_dir
from edge_agent.protocol.canonical import canonical_json
from edge_agent.protocol.manifest import format_time
from edge_agent.protocol.signing import load_private_key
from model_compiler.data import ONNX_DTYPES, Feeds, as_feeds, take
from model_compiler.errors import CompileError, GateFailed
from model_compiler.reference import reference_distribution
from model_compiler.sources import export_source
from model_compiler.tflite import TFLITE_KINDS, export_tflite, latency_tflite_ms, predict_tflite, quantize_tflite
from model_compiler.variants import (
    DYNAMIC_LADDER,
    INT8_LADDER,
    Variant,
    build,
    gate,
    median_latency_ms,
    predict,
    sensitive_nodes,
    session,
)

DEFAULT_TOLERANCE = {"top1": 0.01, "cosine": 0.01, "max_abs": 1e-3}


@dataclass(frozen=True)
class CompileOptions:
    name: str
    version: str
    key_path: Path
    release: int = 0  # 0: the current Unix time, so later compiles always have higher releases
    metric: str = "top1"
    tolerance: float | None = None
    latency_batch: int = 1
    expires_days: int = 365


@dataclass
class ProfileReport:
    profile: str
    artifact: str
    artifact_id: str
    chosen: str
    reason: str
    variants: list[dict[str, Any]] = field(default_factory=list)


def _tool_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("edgefed", "onnxruntime", "onnx", "torch", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def _target_runtime(profile: DeviceProfile) -> str:
    """The profile's preferred runtime: TFLite (LiteRT), TensorRT (ONNX + build config) or ONNX Runtime."""
    for runtime in profile.runtimes:
        if runtime in ("tflite", "tensorrt") or runtime.startswith("onnxruntime"):
            return runtime
    raise CompileError(f"profile {profile.id} lists no runtime this compiler emits for: {list(profile.runtimes)}")


def _candidates(profile: DeviceProfile) -> list[str]:
    """Variant kinds a profile may run, the int8 back-off ladders first."""
    if _target_runtime(profile) == "tflite":
        return [*(["tflite-int8"] if "int8" in profile.precisions else []), "tflite-fp32"]
    kinds: list[str] = []
    if "int8" in profile.precisions:
        kinds += [*INT8_LADDER, *DYNAMIC_LADDER]
    if "fp16" in profile.precisions:
        kinds.append("fp16")
    return [*kinds, "fp32"]


def _choose(variants: list[Variant]) -> tuple[Variant, str]:
    """The fastest variant that passed its gate; never one slower than fp32."""
    passed = [v for v in variants if v.gate.passed]
    if not passed:
        raise GateFailed("no variant passed the accuracy gate, not even fp32; check the metric and tolerance")
    best = min(passed, key=lambda v: v.latency_ms)
    fp32 = next(v for v in variants if v.kind.endswith("fp32"))
    return best, f"{best.kind}: fastest passing variant ({best.latency_ms:.3f} ms vs fp32 {fp32.latency_ms:.3f} ms)"


def _specs(tensors: Any, batch_of_one: bool = False) -> list[dict[str, Any]]:
    """Manifest tensor specs from ONNX Runtime's: a dynamic dimension keeps its name ("batch" first);
    ``batch_of_one`` pins the batch to 1 (TFLite artifacts)."""
    specs = []
    for t in tensors:
        shape = [d if isinstance(d, int) else (1 if batch_of_one else "batch") if axis == 0 else str(d or f"dim{axis}")
                 for axis, d in enumerate(t.shape)]  # fmt: skip
        specs.append({"name": t.name, "dtype": ONNX_DTYPES.get(t.type, "float32"), "shape": shape})
    return specs


def _attempt(variant: Variant, note: str) -> dict[str, Any]:
    return {"kind": variant.kind, "precision": variant.precision, **asdict(variant.gate), "size": variant.size,
            "latency_ms": round(variant.latency_ms, 4), "note": note}  # fmt: skip


def compile_model(
    source: str,
    profiles: list[str],
    calib: tuple[np.ndarray | Feeds, Any],
    val: tuple[np.ndarray | Feeds, Any],
    out_dir: Path,
    options: CompileOptions,
    progress: Callable[[str], None] = lambda _: None,
) -> list[ProfileReport]:
    """Export, quantize, gate, time, and write one signed artifact per profile into ``out_dir``."""
    resolved = [get_profile(p) for p in profiles]
    key = load_private_key(options.key_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    metric = options.metric
    tolerance = options.tolerance if options.tolerance is not None else DEFAULT_TOLERANCE.get(metric, 0.01)
    work = Path(tempfile.mkdtemp(prefix=".compile-", dir=out_dir))
    try:
        progress("exporting fp32 ONNX")
        fp32 = work / "fp32.onnx"
        export_source(source, calib[0], fp32)
        model = session(fp32)
        calib_x, val_x = as_feeds(calib[0], model, "calib"), as_feeds(val[0], model, "val")
        reference = predict(fp32, val_x)
        sample = take(val_x, 0, options.latency_batch)
        built: dict[str, Variant] = {}
        reports = []
        for profile in resolved:
            variants, attempts = [], []
            passed_ladders: set[tuple[str, ...]] = set()
            for kind in _candidates(profile):
                ladder = INT8_LADDER if kind in INT8_LADDER else DYNAMIC_LADDER if kind in DYNAMIC_LADDER else ()
                if ladder in passed_ladders:
                    continue  # a less aggressive step of a ladder is only a back-off
                try:
                    variant = built.get(kind) or _variant(kind, fp32, work, calib_x, val_x, reference, metric,
                                                          tolerance, sample, progress, source)  # fmt: skip
                except Exception as exc:  # a variant that cannot be built is an attempt that failed
                    if kind == "fp32":
                        raise
                    attempts.append({"kind": kind, "precision": kind.split("-")[0], "passed": False,
                                     "note": f"could not be built: {type(exc).__name__}: {exc}"[:300]})  # fmt: skip
                    continue
                built[kind] = variant
                variants.append(variant)
                if ladder and variant.gate.passed:
                    passed_ladders.add(ladder)
                failed = bool(ladder) and not variant.gate.passed
                attempts.append(_attempt(variant, "failed the gate: backing off" if failed else ""))
            chosen, reason = _choose(variants)
            progress(f"{profile.id}: {reason}")
            reports.append(
                _write_artifact(profile, chosen, reason, attempts, fp32, val_x, reference, out_dir, options, key)
            )
        return reports
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _variant(kind: str, fp32: Path, work: Path, calib_x: Feeds, val_x: Feeds, reference: np.ndarray,
             metric: str, tolerance: float, sample: Feeds, progress: Callable[[str], None],
             source: str) -> Variant:  # fmt: skip
    progress(f"building and validating {kind}")
    if kind in TFLITE_KINDS:
        return _tflite_variant(kind, work, calib_x, val_x, reference, metric, tolerance, sample, source)
    exclude = None
    if kind == "int8-dynamic-excluding-sensitive":
        progress("measuring which layers are most sensitive to int8")
        exclude = sensitive_nodes(fp32, work, val_x, reference, metric, tolerance)
    path = build(kind, fp32, work / f"{kind}.onnx", calib_x, exclude)
    result = gate(metric, tolerance, reference, predict(path, val_x))
    return Variant(kind, path, path.stat().st_size, result, median_latency_ms(path, sample))


def _tflite_variant(kind: str, work: Path, calib_x: Feeds, val_x: Feeds, reference: np.ndarray, metric: str,
                    tolerance: float, sample: Feeds, source: str) -> Variant:  # fmt: skip
    fp32 = work / "tflite-fp32.tflite"
    if not fp32.exists():
        export_tflite(source, calib_x, fp32)
    path = fp32
    if kind == "tflite-int8":
        path = work / "tflite-int8.tflite"
        quantize_tflite(fp32, path)
    result = gate(metric, tolerance, reference, predict_tflite(path, val_x))
    return Variant(kind, path, path.stat().st_size, result, latency_tflite_ms(path, sample))


def _write_artifact(
    profile: DeviceProfile,
    chosen: Variant,
    reason: str,
    attempts: list[dict[str, Any]],
    fp32: Path,
    val_x: Feeds,
    reference: np.ndarray,
    out_dir: Path,
    options: CompileOptions,
    key: Any,
) -> ProfileReport:
    final = out_dir / f"{options.name}-{options.version}-{profile.id}"
    if final.exists():
        raise CompileError(f"{final} already exists; remove it or compile a new --version")
    staging = Path(tempfile.mkdtemp(prefix=".artifact-", dir=out_dir))
    staging.chmod(0o755)
    try:
        shutil.copyfile(chosen.path, staging / ("model.tflite" if chosen.kind in TFLITE_KINDS else "model.onnx"))
        model = session(fp32)  # tensor names and types: the same model
        outputs = {model.get_outputs()[0].name: reference}
        atomic_write_bytes(staging / "reference.json", canonical_json(reference_distribution(val_x, outputs)))
        now = datetime.now(UTC)
        runtime = _target_runtime(profile)
        if runtime == "tensorrt":  # the device builds the engine from this ONNX (QDQ for int8) once
            shapes = {name: {"min": [1, *a.shape[1:]], "opt": [8, *a.shape[1:]], "max": [64, *a.shape[1:]]}
                      for name, a in val_x.items()}  # fmt: skip
            trt = {"precision": chosen.precision, "workspace_mb": 1024, "shapes": shapes}
            atomic_write_bytes(staging / "trt_build.json", canonical_json(trt))
        fields = {
            "name": options.name,
            "version": options.version,
            "release": options.release or int(now.timestamp()),
            "hardware": {
                "profile": profile.id,
                "arch": profile.arch,
                "accelerator": profile.accelerator,
                "gpu_compute_capability": profile.gpu_compute_capability,
                "tensorrt": profile.tensorrt,
                "jetpack": profile.jetpack,
            },
            "runtime": runtime,
            "precision": chosen.precision,
            "inputs": _specs(model.get_inputs(), chosen.kind in TFLITE_KINDS),
            "outputs": _specs(model.get_outputs(), chosen.kind in TFLITE_KINDS),
            "source_sha256": hashlib.sha256(fp32.read_bytes()).hexdigest(),
            "created_at": format_time(now),
            "expires_at": format_time(now + timedelta(days=options.expires_days)),
            "tools": _tool_versions(),
            "validation": {**asdict(chosen.gate), "attempts": attempts, "reason": reason},
            "latency_ms": {
                "median": round(chosen.latency_ms, 4),
                "batch": options.latency_batch,
                "host": platform.machine(),
            },
        }
        manifest = seal(staging, fields, key)
        publish_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ProfileReport(profile.id, str(final), manifest.artifact_id, chosen.kind, reason, attempts)
