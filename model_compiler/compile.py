"""compile_model: one source model → one signed, gated artifact per device profile, all with the
same interface and release; a profile that fails is reported, and the others are still built."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from device_profiles import DeviceProfile, get_profile
from edge_agent.protocol.signing import load_private_key
from model_compiler.artifact_writer import Batch, check_outputs_free, resolve_release, write_artifact
from model_compiler.data import Feeds, as_feeds, take
from model_compiler.errors import CompileError, GateFailed
from model_compiler.interface import model_signature
from model_compiler.ladder import Workspace, choose
from model_compiler.options import CompileOptions, ProfileReport
from model_compiler.sources import export_source
from model_compiler.variants import predict, session

__all__ = ["DEFAULT_TOLERANCE", "CompileOptions", "ProfileReport", "compile_model"]

DEFAULT_TOLERANCE = {"top1": 0.01, "cosine": 0.01, "max_abs": 1e-3}


def compile_model(
    source: str,
    profiles: list[str],
    calib: tuple[np.ndarray | Feeds, Any],
    val: tuple[np.ndarray | Feeds, Any],
    out_dir: Path,
    options: CompileOptions,
    progress: Callable[[str], None] = lambda _: None,
) -> list[ProfileReport]:
    """Export, quantize, gate, time, and write one signed artifact per profile into ``out_dir``.

    Raises CompileError/ProfileError for what stops every profile (bad options, source or data, an
    output directory that exists, a release that contradicts the artifacts already there); a failure
    of one profile is its report's ``error``."""
    options.check()
    resolved = list({p.id: p for p in (get_profile(name) for name in profiles)}.values())
    key = load_private_key(options.key_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_outputs_free(out_dir, options, [p.id for p in resolved])
    now = datetime.now(UTC)
    release = resolve_release(out_dir, options, now)
    work = Path(tempfile.mkdtemp(prefix=".compile-", dir=out_dir))
    try:
        progress("exporting fp32 ONNX")
        fp32 = work / "fp32.onnx"
        export_source(source, calib[0], fp32)
        batch = Batch(out_dir, options, model_signature(fp32), release, now, key)
        workspace = _workspace(source, fp32, work, calib, val, options, progress)
        return [_profile(profile, workspace, batch, progress) for profile in resolved]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _workspace(source: str, fp32: Path, work: Path, calib: tuple[np.ndarray | Feeds, Any],
               val: tuple[np.ndarray | Feeds, Any], options: CompileOptions,
               progress: Callable[[str], None]) -> Workspace:  # fmt: skip
    model = session(fp32)
    calib_x, val_x = as_feeds(calib[0], model, "calib"), as_feeds(val[0], model, "val")
    tolerance = options.tolerance if options.tolerance is not None else DEFAULT_TOLERANCE.get(options.metric, 0.01)
    return Workspace(source, fp32, work, calib_x, val_x, predict(fp32, val_x), options.metric, tolerance,
                     take(val_x, 0, options.latency_batch), progress, labels=val[1])  # fmt: skip


def _profile(profile: DeviceProfile, workspace: Workspace, batch: Batch,
             progress: Callable[[str], None]) -> ProfileReport:  # fmt: skip
    """One profile's artifact, or a report of why it has none (never an exception: the others go on)."""
    attempts: list[dict[str, Any]] = []
    try:
        choice = choose(profile, workspace)
        attempts = choice.attempts
        report = write_artifact(
            profile, choice, workspace.fp32, workspace.val, workspace.reference, batch, workspace.labels
        )
    except Exception as exc:
        if isinstance(exc, GateFailed):
            attempts = exc.attempts
        error = str(exc) if isinstance(exc, CompileError) else f"{type(exc).__name__}: {exc}"
        progress(f"{profile.id}: failed: {error}")
        return ProfileReport(profile.id, "", "", "", "", attempts, error=error)
    progress(f"{profile.id}: {choice.reason}")
    return report
