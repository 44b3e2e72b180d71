"""Backtesting: recorded inputs through exactly the device's binning and the hub's detector.

The inputs (named arrays, samples along axis 0, in order) run through the artifact's own model with
the device's runtime, so output features (class counts, confidence) are the ones a device would count;
each window of ``window_calls`` samples is counted with ``Sketch.count`` (the device's code) and fed to
``SequentialDetector.update`` (the hub's). After an alarm the detector starts again, so a clean stream's
alarms are its false alarms.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cloud_hub.drift.sequential import SequentialDetector
from cloud_hub.errors import HubError
from edge_agent.protocol.manifest import Manifest, manifest_from_wire
from edge_agent.protocol.sketch import Sketch
from edge_agent.runtimes import open_runtime

RUN_ROWS = 4096  # rows per model run (fewer when the version's max_batch says so)


class BacktestError(HubError):
    """Bad backtest input, named with its fix."""


def load_inputs(path: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """The arrays of ``path`` (.npz) named as the model's inputs, all with the same number of samples."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise BacktestError(f"{path}: cannot read it as .npz ({exc}); save the inputs with numpy.savez") from None
    wanted = [spec.name for spec in manifest.inputs]
    missing = [name for name in wanted if name not in arrays]
    if missing:
        raise BacktestError(f"{path}: no array named {', '.join(missing)}; the model's inputs are "
                            f"{', '.join(wanted)} (name the arrays so in numpy.savez)")  # fmt: skip
    lengths = {name: len(arrays[name]) for name in wanted}
    if len(set(lengths.values())) != 1:
        raise BacktestError(f"{path}: the inputs hold different numbers of samples {lengths}; give each the same")
    return {name: arrays[name] for name in wanted}


def model_outputs(directory: Path, manifest: Manifest, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    runtime = open_runtime(directory, manifest)
    rows = min(RUN_ROWS, manifest.max_batch or RUN_ROWS)
    samples = len(next(iter(inputs.values())))
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, samples, rows):
        feed = {name: np.ascontiguousarray(array[start : start + rows]) for name, array in inputs.items()}
        parts.append(runtime.run(feed))
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]} if parts else {}


def backtest(directory: Path, data: Path, window_calls: int = 50, false_alarms_per_100k: float = 1.0) -> dict[str, Any]:
    """Run the backtest; the JSON-able result (``alarm_index``: the last sample of the window whose
    update raised the first alarm, or None)."""
    if window_calls < 1:
        raise BacktestError(f"--window-calls {window_calls}: give at least 1 call per window")
    try:
        manifest = manifest_from_wire(json.loads((directory / "manifest.json").read_text()))
    except (OSError, ValueError) as exc:
        raise BacktestError(f"{directory}: not an artifact directory ({exc})") from None
    sketch = Sketch.load(directory)
    if sketch is None:
        raise BacktestError(f"{directory}: the artifact has no reference.json; compile it again with model-compiler")
    inputs = load_inputs(data, manifest)
    tensors = {**inputs, **model_outputs(directory, manifest, inputs)}
    reference = {feature.name: feature.counts for feature in sketch.features}
    detector = SequentialDetector(reference, false_alarms_per_100k=false_alarms_per_100k, window_calls=window_calls)
    samples = len(next(iter(inputs.values())))
    alarms: list[int] = []
    scores: list[float] = []
    first_drifting: list[str] = []
    for start in range(0, samples, window_calls):
        window = sketch.count({name: array[start : start + window_calls] for name, array in tensors.items()})
        result = detector.update(window)
        scores.append(round(result.combined, 4))
        if result.alarm:
            alarms.append(min(start + window_calls, samples) - 1)
            first_drifting = first_drifting or list(result.drifting)
            detector.reset()
    return {
        "model": manifest.name,
        "version": manifest.version,
        "samples": samples,
        "window_calls": window_calls,
        "windows": len(scores),
        "features": len(reference),
        "threshold": round(detector.threshold, 4),
        "false_alarms_per_100k_target": false_alarms_per_100k,
        "alarm_index": alarms[0] if alarms else None,
        "alarms": alarms,
        "drifting": first_drifting,
        "scores": scores,
    }
