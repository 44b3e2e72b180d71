"""Artifacts on disk: where each profile's goes, the one release number all artifacts of a version
share, and writing one signed artifact (model, reference distribution, TensorRT build config, manifest)."""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from device_profiles import DeviceProfile
from edge_agent.protocol.artifact import seal
from edge_agent.protocol.atomic import atomic_write_bytes, publish_dir
from edge_agent.protocol.canonical import canonical_json
from edge_agent.protocol.manifest import format_time
from edge_agent.protocol.sketch import build_reference
from model_compiler.data import Feeds
from model_compiler.errors import CompileError
from model_compiler.golden import write_golden
from model_compiler.interface import Signature
from model_compiler.ladder import Choice
from model_compiler.options import CompileOptions, ProfileReport
from model_compiler.tflite import TFLITE_KINDS, predict_tflite
from model_compiler.variants import predict

DEFAULT_MAX_BATCH = 64  # TensorRT's max shape when the interface sets no limit


@dataclass(frozen=True)
class Batch:
    """What every artifact of one compile shares."""

    out_dir: Path
    options: CompileOptions
    signature: Signature
    release: int
    now: datetime
    key: Any  # Ed25519 private key


def artifact_dir(out_dir: Path, options: CompileOptions, profile_id: str) -> Path:
    return out_dir / f"{options.name}-{options.version}-{profile_id}"


def check_outputs_free(out_dir: Path, options: CompileOptions, profile_ids: list[str]) -> None:
    """Raise CompileError, before anything is built, when a profile's artifact directory exists."""
    taken = [str(d) for d in (artifact_dir(out_dir, options, p) for p in profile_ids) if d.exists()]
    if taken:
        raise CompileError(f"{', '.join(taken)} already exist{'s' if len(taken) == 1 else ''}; remove "
                           f"{'it' if len(taken) == 1 else 'them'}, leave those profiles out, or compile a new "
                           "--version")  # fmt: skip


def existing_releases(out_dir: Path, name: str, version_: str) -> dict[int, list[str]]:
    """Releases of ``name@version`` artifacts already in ``out_dir`` (from their manifest.json), each
    with the directories that carry it."""
    found: dict[int, list[str]] = {}
    for manifest in sorted(out_dir.glob("*/manifest.json")):
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        ours = isinstance(data, dict) and data.get("name") == name and data.get("version") == version_
        if ours and isinstance(data.get("release"), int):
            found.setdefault(data["release"], []).append(manifest.parent.name)
    return found


def resolve_release(out_dir: Path, options: CompileOptions, now: datetime) -> int:
    """One release per version: the one this version's artifacts in ``out_dir`` already carry, else
    ``--release``, else the current Unix time (so a later version's release is higher)."""
    found = existing_releases(out_dir, options.name, options.version)
    label = f"{options.name}@{options.version}"
    if len(found) > 1:
        listed = "; ".join(f"release {r}: {', '.join(dirs)}" for r, dirs in sorted(found.items()))
        raise CompileError(f"{out_dir} holds {label} artifacts with different releases ({listed}); one version has "
                           "one release: remove the artifacts that do not belong")  # fmt: skip
    if not found:
        return options.release or int(now.timestamp())
    ((release, dirs),) = found.items()
    if options.release and options.release != release:
        raise CompileError(f"--release {options.release} differs from release {release} of the {label} artifacts "
                           f"already in {out_dir} ({', '.join(dirs)}); all artifacts of one version share one "
                           f"release: pass --release {release} or leave --release out, or compile into another "
                           "--out")  # fmt: skip
    return release


def budget_warning(profile: DeviceProfile, latency_ms: float) -> str:
    """A warning when the measured latency is over the profile's budget ("" when within it)."""
    if latency_ms <= profile.latency_budget_ms:
        return ""
    return (f"measured {latency_ms:.3f} ms on the build host ({platform.machine()}) is over {profile.id}'s "
            f"{profile.latency_budget_ms:g} ms budget; the SDK will count budget breaches")  # fmt: skip


def write_artifact(profile: DeviceProfile, choice: Choice, fp32: Path, val: Feeds, reference: np.ndarray,
                   batch: Batch, labels: Any = None) -> ProfileReport:  # fmt: skip
    """Stage the payload (golden samples from ``val`` and ``labels`` among it) and manifest in a temporary
    directory, sign, and publish it by a rename."""
    final = artifact_dir(batch.out_dir, batch.options, profile.id)
    if final.exists():
        raise CompileError(f"{final} already exists; remove it or compile a new --version")
    staging = Path(tempfile.mkdtemp(prefix=".artifact-", dir=batch.out_dir))
    staging.chmod(0o755)
    warning = budget_warning(profile, choice.variant.latency_ms)
    try:
        _payload(staging, choice, fp32, val, reference, batch)
        golden = _golden(staging, choice, val, reference, labels, batch)
        fields = _fields(profile, choice, fp32, batch, over_budget=bool(warning))
        if golden is not None:
            fields["validation"]["golden"] = golden
        manifest = seal(staging, fields, batch.key)
        publish_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    warnings = [*choice.fallbacks, *([warning] if warning else []), *reference_warnings(len(reference))]
    return ProfileReport(profile.id, str(final), manifest.artifact_id, choice.variant.kind, choice.reason,
                         choice.attempts, runtime=choice.runtime, warnings=warnings)  # fmt: skip


MIN_REFERENCE_SAMPLES = 2000


def reference_warnings(samples: int) -> list[str]:
    """The drift detector takes the reference's proportions as exact: from few samples they are not,
    and a clean stream raises more false alarms (about 2 per 100,000 samples from 500, docs/drift.md)."""
    if samples >= MIN_REFERENCE_SAMPLES:
        return []
    return [f"drift reference from {samples} validation samples: give --val at least {MIN_REFERENCE_SAMPLES} "
            "for the hub's drift alarms to keep their false-alarm rate"]  # fmt: skip


def _payload(staging: Path, choice: Choice, fp32: Path, val: Feeds, reference: np.ndarray, batch: Batch) -> None:
    chosen = choice.variant
    shutil.copyfile(chosen.path, staging / ("model.tflite" if chosen.kind in TFLITE_KINDS else "model.onnx"))
    outputs = {batch.signature.outputs[0]["name"]: reference}
    atomic_write_bytes(staging / "reference.json", canonical_json(build_reference(val, outputs)))
    if choice.runtime == "tensorrt":  # the device builds the engine from this ONNX (QDQ for int8) once
        most = batch.options.max_batch or DEFAULT_MAX_BATCH
        shapes = {name: {"min": [1, *a.shape[1:]], "opt": [min(8, most), *a.shape[1:]], "max": [most, *a.shape[1:]]}
                  for name, a in val.items()}  # fmt: skip
        trt = {"precision": chosen.precision, "workspace_mb": 1024, "shapes": shapes}
        atomic_write_bytes(staging / "trt_build.json", canonical_json(trt))


def _golden(staging: Path, choice: Choice, val: Feeds, reference: np.ndarray, labels: Any,
            batch: Batch) -> dict[str, Any] | None:  # fmt: skip
    """golden.npz and its ``validation.golden``: the shipped variant measured on the golden rows."""
    path, kind = choice.variant.path, choice.variant.kind

    def run(feeds: Feeds) -> np.ndarray:
        return predict_tflite(path, feeds) if kind in TFLITE_KINDS else predict(path, feeds)

    output = batch.signature.outputs[0]["name"]
    return write_golden(staging, val, reference, labels, output, batch.options.metric, run)


def _fields(profile: DeviceProfile, choice: Choice, fp32: Path, batch: Batch, over_budget: bool) -> dict[str, Any]:
    chosen, options = choice.variant, batch.options
    return {
        "name": options.name,
        "version": options.version,
        "release": batch.release,
        "hardware": {
            "profile": profile.id,
            "arch": profile.arch,
            "accelerator": profile.accelerator,
            "gpu_compute_capability": profile.gpu_compute_capability,
            "tensorrt": profile.tensorrt,
            "jetpack": profile.jetpack,
        },
        "runtime": choice.runtime,
        "precision": chosen.precision,
        "inputs": batch.signature.inputs,
        "outputs": batch.signature.outputs,
        "max_batch": options.max_batch,
        "source_sha256": hashlib.sha256(fp32.read_bytes()).hexdigest(),
        "created_at": format_time(batch.now),
        "expires_at": format_time(batch.now + timedelta(days=options.expires_days)),
        "tools": _tool_versions(),
        "validation": {
            **asdict(chosen.gate),
            "attempts": choice.attempts,
            "reason": choice.reason,
            "fallbacks": choice.fallbacks,
        },
        "latency_ms": {
            "median": round(chosen.latency_ms, 4),
            "batch": 1 if chosen.kind in TFLITE_KINDS else options.latency_batch,  # TFLite runs row by row
            "host": platform.machine(),
            "budget_ms": profile.latency_budget_ms,
            "over_budget": over_budget,
        },
    }


def _tool_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("edgefed", "onnxruntime", "onnx", "torch", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found
