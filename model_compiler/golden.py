"""Golden samples for an artifact: a few validation rows covering several classes, the fp32 reference's
output on them, and the tolerance the agent checks the shipped variant with before activating it
(the format: ``edge_agent.protocol.golden``; docs/artifact-format.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.protocol.atomic import atomic_write_bytes
from edge_agent.protocol.golden import GOLDEN_FILE, GOLDEN_ROWS, encode_golden, golden_entry, storable
from model_compiler.data import Feeds, rows, take


def class_of(reference: np.ndarray, labels: Any) -> np.ndarray | None:
    """Each validation row's class: its label where labels are given (one per row), else the fp32
    model's top-1 for score outputs, else None (regressions, embeddings, strings)."""
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and len(labels) == len(reference):
        return labels
    flat = reference.reshape(len(reference), -1)
    if reference.dtype.kind == "f" and flat.shape[1] >= 2:
        return np.asarray(flat.argmax(1))
    if reference.dtype.kind in "biu" and reference.ndim == 1:
        return reference
    return None


def confidence(reference: np.ndarray) -> np.ndarray:
    """The fp32 model's margin between its two best scores per row (0 for non-score outputs): rows with
    a clear winner keep their top-1 on another CPU or runtime, so they make stable golden samples."""
    flat = reference.reshape(len(reference), -1)
    if reference.dtype.kind != "f" or flat.shape[1] < 2:
        return np.zeros(len(reference))
    top2 = np.sort(flat.astype(np.float64), axis=1)[:, -2:]
    return np.asarray(np.nan_to_num(top2[:, 1] - top2[:, 0], nan=-np.inf))


def pick_rows(reference: np.ndarray, labels: Any, count: int = GOLDEN_ROWS) -> np.ndarray:
    """Up to ``count`` row indices: the most confident row of each class in turn (classes ordered by
    their best row), so the samples cover as many classes as there are rows; the first rows when there
    are no classes."""
    classes = class_of(reference, labels)
    if classes is None:
        return np.arange(min(count, len(reference)))
    order = np.argsort(-confidence(reference), kind="stable")
    queues: dict[Any, list[int]] = {}
    for index in order:
        queues.setdefault(classes[index].item(), []).append(int(index))
    picked: list[int] = []
    while len(picked) < min(count, len(reference)):
        for queue in queues.values():
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return np.array(sorted(picked))


def write_golden(staging: Path, val: Feeds, reference: np.ndarray, labels: Any, output: str, gate_metric: str,
                 predict: Any) -> dict[str, Any] | None:  # fmt: skip
    """Write ``golden.npz`` into ``staging`` and return the manifest's ``validation.golden``; ``predict``
    runs the shipped variant on feeds (its first output). None, with nothing written, when the data
    cannot be stored without pickles (objects that are not text)."""
    if not rows(val):
        return None
    picked = pick_rows(reference, labels)
    inputs = {name: array[picked] for name, array in val.items()}
    expected = reference[picked]
    try:
        data = encode_golden(inputs, {output: expected})
        storable(expected)
    except ValueError:
        return None
    actual = np.asarray(predict(take(inputs, 0, len(picked))))
    classes = class_of(reference, labels)
    entry = golden_entry(gate_metric, expected, actual, output,
                         None if classes is None else len({c.item() for c in classes[picked]}))  # fmt: skip
    atomic_write_bytes(staging / GOLDEN_FILE, data)
    return entry
