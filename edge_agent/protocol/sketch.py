"""The drift reference (``reference.json``, signed with the artifact) and the binning that counts live
data on it: the one definition the compiler (building it), the device (counting calls) and the hub
(backtests) share, so a count means the same thing everywhere.

Each input or output tensor becomes **features**, each a histogram on its own quantile bins:

- ``value``: one per element when a sample has at most MAX_VALUE_FEATURES (``input/3``);
- ``projection``: otherwise, PROJECTIONS seeded random projections of the flattened sample
  (``input/proj/0``; the seed is in the reference), plus ``channel_mean`` per channel where the
  tensor has a channel axis (``input/channel/0``: NCHW or NHWC with at most 4 channels);
- ``class`` and ``confidence`` (max softmax) for a classifier's scores (2-100 values per sample) or
  a label output (one non-negative integer per sample).

Binning: bins are cut at the reference's quantiles (about BINS bins of equal reference mass; tied
values, such as a pixel that is mostly 0, give fewer); a value equal to a cut goes to the bin above,
values beyond the outer edges to the first or last bin. A batch whose samples have another number of
elements than the reference's (a variable-length input; the reference's value features and projections
say how many) is not counted at all. Only counts leave the device, and counts from many devices add up
exactly. A ``/1`` reference (one pooled histogram per tensor) is still read: each
tensor is then one ``pooled`` feature counting every element.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = "edgefed.reference/2"
BINS = 10
MAX_VALUE_FEATURES = 256  # samples with more elements than this are projected
PROJECTIONS = 16
MAX_CHANNELS = 4
MAX_CLASSES = 100  # float outputs with 2..MAX_CLASSES values per sample are taken as class scores
MAX_LABEL = 4096


@dataclass(frozen=True)
class Feature:
    """One histogram: ``edges`` (bins + 1, increasing; the inner ones are the cuts) and the reference
    ``counts``. ``index``: the element, projection, channel or (for class) nothing."""

    name: str
    tensor: str
    kind: str  # value | projection | channel_mean | class | confidence | pooled
    index: int
    edges: np.ndarray
    counts: np.ndarray

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "tensor": self.tensor, "kind": self.kind, "index": self.index,
                "edges": [float(e) for e in self.edges], "counts": [int(c) for c in self.counts]}  # fmt: skip


@dataclass(frozen=True)
class _Tensor:
    """How one tensor's samples become feature values: which kinds, the projection, the channel axis."""

    name: str
    features: tuple[Feature, ...]
    projection: np.ndarray | None  # (elements, PROJECTIONS)
    channel_axis: int | None
    cuts: np.ndarray  # (features, most cuts), padded with +inf
    offsets: np.ndarray  # where each feature's counts start in the flat count vector
    elements: int | None  # elements per sample the reference was built on (None: any, as for ``pooled``)

    def fits(self, batch: np.ndarray) -> bool:
        """Whether ``batch`` has samples shaped as the reference's: the same elements per sample (and
        channels, when there are channel means); any other is not counted at all, not even in part."""
        if batch.ndim < 1 or not len(batch):
            return False
        if self.elements is not None and batch.size // len(batch) != self.elements:
            return False
        channels = sum(f.kind == "channel_mean" for f in self.features)
        axis = self.channel_axis
        return not channels or (axis is not None and batch.ndim == 4 and batch.shape[axis] == channels)

    def values(self, batch: np.ndarray) -> np.ndarray:
        """(samples, features) in the order of ``features``."""
        return np.concatenate([v for kind in _KINDS if (v := self._kind(kind, batch)) is not None], axis=1)

    def _kind(self, kind: str, batch: np.ndarray) -> np.ndarray | None:
        indices = [f.index for f in self.features if f.kind == kind]
        if not indices:
            return None
        flat = batch.reshape(len(batch), -1).astype(np.float64, copy=False)
        if kind == "value":
            return flat[:, indices]
        if kind == "pooled":
            return flat.reshape(-1, 1)
        if kind == "projection":
            assert self.projection is not None
            return np.asarray(flat @ self.projection)
        if kind == "channel_mean":
            assert self.channel_axis is not None
            return _channel_means(batch, self.channel_axis)
        if kind == "class":
            return (flat.argmax(1) if flat.shape[1] > 1 else flat[:, 0]).reshape(-1, 1).astype(np.float64)
        return _confidence(flat).reshape(-1, 1)


_KINDS = ("value", "pooled", "projection", "channel_mean", "class", "confidence")


class Sketch:
    """The features of a reference, and ``count`` to bin live batches on them."""

    def __init__(self, features: list[Feature], projections: Mapping[str, tuple[int, int, int]] | None = None,
                 channel_axes: Mapping[str, int] | None = None) -> None:  # fmt: skip
        order = {kind: i for i, kind in enumerate(_KINDS)}
        self.features = tuple(sorted(features, key=lambda f: (f.tensor, order[f.kind], f.index)))
        projections, channel_axes = projections or {}, channel_axes or {}
        self._by_name = {f.name: f for f in self.features}
        self._tensors = {}
        for name in dict.fromkeys(f.tensor for f in self.features):
            own = [f for f in self.features if f.tensor == name]
            self._tensors[name] = _tensor(name, own, projections.get(name), channel_axes.get(name))

    @property
    def tensors(self) -> tuple[str, ...]:
        return tuple(self._tensors)

    def features_of(self, tensor: str) -> tuple[Feature, ...]:
        return self._tensors[tensor].features

    def feature(self, name: str) -> Feature | None:
        return self._by_name.get(name)

    def count(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Feature name → int64 counts of the samples in ``tensors`` (batches, samples on axis 0); a
        tensor the sketch does not know, that is not numeric, or whose samples have another number of
        elements than the reference's (a variable-length input) is left out."""
        result: dict[str, np.ndarray] = {}
        for name, batch in tensors.items():
            tensor = self._tensors.get(name)
            array = np.asarray(batch)
            if tensor is None or array.dtype.kind not in "biuf" or not array.size or not tensor.fits(array):
                continue
            values = tensor.values(array)
            index = (values[:, :, None] >= tensor.cuts[None, :, :]).sum(2) + tensor.offsets
            flat = np.bincount(index.ravel(), minlength=int(tensor.offsets[-1] + len(tensor.features[-1].counts)))
            for feature, start in zip(tensor.features, tensor.offsets.tolist(), strict=True):
                result[feature.name] = flat[start : start + len(feature.counts)].astype(np.int64)
        return result

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Sketch | None:
        """A ``/2`` reference's features, or a ``/1`` reference's pooled histograms; None when it has none."""
        if data.get("schema") == SCHEMA:
            features = [Feature(f["name"], f["tensor"], f["kind"], int(f["index"]),
                                np.asarray(f["edges"], np.float64), np.asarray(f["counts"], np.int64))
                        for f in data["features"]]  # fmt: skip
            projections = {name: (int(p["seed"]), int(p["count"]), int(p["elements"]))
                           for name, p in data.get("projections", {}).items()}  # fmt: skip
            return cls(features, projections, data.get("channel_axes")) if features else None
        pooled = []
        for section in ("inputs", "outputs"):
            for name, summary in (data.get(section) or {}).items():
                hist = summary.get("histogram") if isinstance(summary, dict) else None
                if hist and len(hist.get("edges", [])) >= 2:
                    pooled.append(Feature(name, name, "pooled", 0, np.asarray(hist["edges"], np.float64),
                                          np.asarray(hist["counts"], np.int64)))  # fmt: skip
        return cls(pooled) if pooled else None

    @classmethod
    def load(cls, directory: Path) -> Sketch | None:
        """The sketch of an artifact directory's ``reference.json``; None when there is none."""
        try:
            data = json.loads((directory / "reference.json").read_text())
        except (OSError, ValueError):
            return None
        return cls.from_json(data) if isinstance(data, dict) else None


def _tensor(name: str, features: list[Feature], projection: tuple[int, int, int] | None,
            channel_axis: int | None) -> _Tensor:  # fmt: skip
    cuts = [f.edges[1:-1] for f in features]
    padded = np.full((len(features), max([1, *map(len, cuts)])), np.inf)
    for i, c in enumerate(cuts):
        padded[i, : len(c)] = c
    offsets = np.concatenate([[0], np.cumsum([len(f.counts) for f in features])[:-1]]).astype(np.int64)
    matrix = projection_matrix(*projection) if projection is not None else None
    values = [f.index for f in features if f.kind == "value"]  # one per element (build_reference)
    elements = projection[2] if projection is not None else max(values) + 1 if values else None
    return _Tensor(name, tuple(features), matrix, channel_axis, padded, offsets, elements)


def projection_matrix(seed: int, count: int, elements: int) -> np.ndarray:
    """(elements, count) Gaussian projections scaled by 1/sqrt(elements), from ``seed`` (PCG64)."""
    return np.asarray(np.random.default_rng(seed).standard_normal((elements, count)) / np.sqrt(elements))


def _channel_means(batch: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(batch, axis, 1)
    return np.asarray(moved.reshape(len(batch), moved.shape[1], -1).mean(2), np.float64)


def _confidence(scores: np.ndarray) -> np.ndarray:
    """Max class probability: the scores as they are when every row is a distribution, else softmax."""
    if scores.shape[1] < 2:
        return np.asarray(scores[:, 0])
    if scores.min() >= 0 and np.allclose(scores.sum(1), 1.0, atol=1e-3):
        return np.asarray(scores.max(1))
    shifted = np.exp(scores - scores.max(1, keepdims=True))
    return np.asarray(1.0 / shifted.sum(1))  # the top class's exp is 1 after the shift


# building a reference (the compiler) ----------------------------------------------------------------
def build_reference(inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], *, bins: int = BINS,
                    projections: int = PROJECTIONS, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """The ``reference.json`` of a model from sample inputs and the model's outputs on them (numeric
    tensors only; strings have no features). Reference counts come from ``Sketch.count`` itself, so the
    device's binning and the reference's are one."""
    features: list[Feature] = []
    meta: dict[str, Any] = {"projections": {}, "channel_axes": {}}
    for name, array in inputs.items():
        if _numeric(array):
            features += _input_features(name, np.asarray(array), bins, projections, seed, meta)
    for name, array in outputs.items():
        if _numeric(array):
            features += _output_features(name, np.asarray(array), bins, projections, seed, meta)
    projected = {n: (p["seed"], p["count"], p["elements"]) for n, p in meta["projections"].items()}
    draft = Sketch(features, projected, meta["channel_axes"])
    counted = draft.count({**inputs, **outputs})
    final = [Feature(f.name, f.tensor, f.kind, f.index, f.edges, counted[f.name]) for f in draft.features]
    return {
        "schema": SCHEMA,
        "samples": len(next(iter(outputs.values()))) if outputs else 0,
        "bins": bins,
        "features": [f.to_json() for f in final],
        **meta,
        **_pooled_summaries(inputs, outputs),
    }


def _numeric(array: np.ndarray) -> bool:
    array = np.asarray(array)
    return array.dtype.kind in "biuf" and array.size > 0 and array.ndim >= 1


def _input_features(name: str, array: np.ndarray, bins: int, projections: int, seed: int,
                    meta: dict[str, Any]) -> list[Feature]:  # fmt: skip
    flat = array.reshape(len(array), -1).astype(np.float64)
    if flat.shape[1] <= MAX_VALUE_FEATURES:
        return [_feature(name, "value", i, flat[:, i], bins) for i in range(flat.shape[1])]
    tensor_seed = seed + sum(name.encode())  # each tensor its own projections
    meta["projections"][name] = {"seed": tensor_seed, "count": projections, "elements": flat.shape[1]}
    projected = flat @ projection_matrix(tensor_seed, projections, flat.shape[1])
    features = [_feature(name, "projection", k, projected[:, k], bins) for k in range(projections)]
    axis = _channel_axis(array.shape)
    if axis is not None:
        meta["channel_axes"][name] = axis
        means = _channel_means(array, axis)
        features += [_feature(name, "channel_mean", c, means[:, c], bins) for c in range(means.shape[1])]
    return features


def _output_features(name: str, array: np.ndarray, bins: int, projections: int, seed: int,
                     meta: dict[str, Any]) -> list[Feature]:  # fmt: skip
    flat = array.reshape(len(array), -1)
    if array.dtype.kind in "biu" and flat.shape[1] == 1 and flat.min() >= 0 and flat.max() <= MAX_LABEL:
        return [_class_feature(name, int(flat.max()) + 1)]
    if array.dtype.kind == "f" and 2 <= flat.shape[1] <= MAX_CLASSES:
        scores = flat.astype(np.float64)
        return [_class_feature(name, flat.shape[1]), _feature(name, "confidence", 0, _confidence(scores), bins),
                *(_feature(name, "value", i, scores[:, i], bins) for i in range(flat.shape[1]))]  # fmt: skip
    return _input_features(name, array, bins, projections, seed, meta)


def _class_feature(name: str, classes: int) -> Feature:
    edges = np.arange(classes + 1, dtype=np.float64) - 0.5  # one bin per class
    return Feature(f"{name}/class", name, "class", 0, edges, np.zeros(classes, np.int64))


def _feature(tensor: str, kind: str, index: int, values: np.ndarray, bins: int) -> Feature:
    """Quantile cuts of ``values`` (ties merged; a constant gets a bin of its own between two empty
    ones, so any change from it shows)."""
    values = values[np.isfinite(values)]
    if not values.size:  # nothing finite to learn from: one bin of its own at 0
        values = np.zeros(1)
    cuts = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    low, high = float(values.min()), float(values.max())
    if low == high:
        cuts = np.array([low, np.nextafter(low, np.inf)])
    edges = np.concatenate([[min(low, cuts[0])], cuts, [max(high, cuts[-1])]])
    name = {"value": f"{tensor}/{index}", "projection": f"{tensor}/proj/{index}",
            "channel_mean": f"{tensor}/channel/{index}", "confidence": f"{tensor}/confidence"}[kind]  # fmt: skip
    return Feature(name, tensor, kind, index, edges, np.zeros(len(edges) - 1, np.int64))


def _channel_axis(shape: tuple[int, ...]) -> int | None:
    if len(shape) != 4:
        return None
    if shape[1] <= MAX_CHANNELS < min(shape[2], shape[3]):
        return 1
    if shape[3] <= MAX_CHANNELS < min(shape[1], shape[2]):
        return 3
    return None


def _pooled_summaries(inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The ``/1`` summaries (one pooled histogram, mean and std per tensor), kept for agents older than
    features."""

    def summary(values: np.ndarray) -> dict[str, Any]:
        flat = values.reshape(-1).astype(np.float64)
        flat = flat[np.isfinite(flat)] if flat.size and np.isfinite(flat).any() else np.zeros(1)
        low, high = float(flat.min()), float(flat.max())
        counts, edges = np.histogram(flat, bins=20, range=(low, high if high > low else low + 1.0))
        histogram = {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}
        return {"mean": float(flat.mean()), "std": float(flat.std()), "histogram": histogram}

    return {section: {name: summary(np.asarray(a)) for name, a in tensors.items() if _numeric(a)}
            for section, tensors in (("inputs", inputs), ("outputs", outputs))}  # fmt: skip
