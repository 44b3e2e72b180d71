"""The golden-sample check the agent runs before activating a version: the artifact's golden rows
through the real runtime, compared with the fp32 reference's outputs within the artifact's signed
tolerance (format and tolerance rule: ``edge_agent.protocol.golden``). Called from
``edge_agent.agent.health_check``; an artifact without golden samples (an older compiler) skips it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.protocol.errors import ArtifactRejected, ProtocolError
from edge_agent.protocol.golden import as_text_objects, check_spec, decode_golden, golden_passes, golden_value
from edge_agent.protocol.manifest import Manifest
from edge_agent.runtimes import Runtime
from edge_agent.store import kill_point

log = logging.getLogger(__name__)


class GoldenSamplesFailed(ArtifactRejected):
    """The version's golden samples did not check out (reason ``golden``): it stays installed, inactive,
    and the previous version keeps serving. The message reads ``golden samples: ...``."""

    def __init__(self, detail: str) -> None:
        self.reason, self.detail = "golden", detail
        ProtocolError.__init__(self, f"golden samples: {detail}")


def check_golden(directory: Path, manifest: Manifest, runtime: Runtime) -> float | None:
    """Run the golden samples of the installed artifact in ``directory`` through ``runtime``; the value
    reached (see ``golden_value``), or None when the artifact has none. Raises GoldenSamplesFailed."""
    if "golden" not in manifest.validation:
        return None
    try:
        spec = check_spec(manifest.validation["golden"])
    except ValueError as exc:
        raise GoldenSamplesFailed(str(exc)) from None
    inputs, expected = _load(directory, manifest, spec)
    kill_point("golden")
    outputs = _run(runtime, inputs, manifest.max_batch)
    if spec["output"] not in outputs:
        raise GoldenSamplesFailed(f"the model has no output {spec['output']!r}")
    try:
        value = golden_value(spec["metric"], expected, np.asarray(outputs[spec["output"]]))
    except ValueError as exc:
        raise GoldenSamplesFailed(f"output {spec['output']!r}: {exc}") from None
    if not golden_passes(spec["metric"], value, float(spec["limit"])):
        raise GoldenSamplesFailed(_shortfall(spec, value))
    log.info("golden samples of %s@%s: %s %.6g (limit %.6g)", manifest.name, manifest.version, spec["metric"],
             value, spec["limit"])  # fmt: skip
    return value


def _load(directory: Path, manifest: Manifest, spec: dict[str, Any]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The samples, from a file the signed manifest lists (so verified by its sha256 on install)."""
    if spec["file"] not in {entry.path for entry in manifest.files}:
        raise GoldenSamplesFailed(f"{spec['file']} is not among the artifact's signed files")
    try:
        inputs, expected = decode_golden((directory / spec["file"]).read_bytes())
    except (OSError, ValueError) as exc:
        raise GoldenSamplesFailed(f"{spec['file']} cannot be read: {exc}") from None
    names = [spec.name for spec in manifest.inputs]
    if sorted(inputs) != sorted(names) or spec["output"] not in expected:
        raise GoldenSamplesFailed(f"{spec['file']} holds inputs {sorted(inputs)} and outputs {sorted(expected)}; "
                                  f"the model takes {names} and the check reads {spec['output']!r}")  # fmt: skip
    texts = {s.name for s in manifest.inputs if s.dtype == "bytes"}
    feeds = {n: as_text_objects(a) if n in texts else a for n, a in inputs.items()}
    return feeds, expected[spec["output"]]


def _run(runtime: Runtime, inputs: dict[str, np.ndarray], max_batch: int) -> dict[str, np.ndarray]:
    """The outputs for every row, ``max_batch`` rows per call; a raising model names the rows it raised on."""
    total = len(next(iter(inputs.values())))
    step = max_batch or total or 1
    try:
        parts = [runtime.run({n: a[i : i + step] for n, a in inputs.items()}) for i in range(0, total, step)]
    except Exception as exc:
        raise GoldenSamplesFailed(_raised(runtime, inputs, total, exc)) from None
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]} if parts else {}


def _raised(runtime: Runtime, inputs: dict[str, np.ndarray], total: int, first: Exception) -> str:
    """Which rows the model raises on, row by row, and the first error."""
    failed = []
    for i in range(total):
        try:
            runtime.run({n: a[i : i + 1] for n, a in inputs.items()})
        except Exception:
            failed.append(i)
    rows = ", ".join(map(str, failed)) if failed else "only when batched"
    return f"the model raised on {len(failed)} of {total} rows ({rows}): {type(first).__name__}: {first}"[:400]


def _shortfall(spec: dict[str, Any], value: float) -> str:
    rows, metric, limit = spec["rows"], spec["metric"], float(spec["limit"])
    if metric in ("top1", "exact"):
        what = "top-1 class" if metric == "top1" else "output"
        return (f"{round(value * rows)} of {rows} rows have the expected {what}, at least {round(limit * rows)} "
                "must: the model is not the one the compiler validated")  # fmt: skip
    if metric == "cosine":
        return f"lowest cosine to the expected output {value:.6f}, at least {limit:.6f} required"
    return f"largest difference from the expected output {value:.6g}, at most {limit:.6g} allowed"
