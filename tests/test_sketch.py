"""The drift reference (``edgefed.reference/2``) and the binning shared by compiler, device and hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.protocol.sketch import Sketch, build_reference

RNG = np.random.default_rng(0)


def roundtrip(reference: dict[str, Any]) -> Sketch:
    sketch = Sketch.from_json(json.loads(json.dumps(reference)))
    assert sketch is not None
    return sketch


def test_each_input_value_gets_its_own_quantile_bins_and_the_reference_counts_are_the_binning_s() -> None:
    x = RNG.standard_normal((2000, 10)) * np.arange(1, 11)  # each feature its own scale
    reference = build_reference({"x": x}, {"y": RNG.standard_normal((2000, 1))})
    features = {f["name"]: f for f in reference["features"]}
    assert [f"x/{i}" for i in range(10)] == [n for n in features if n.startswith("x/")]
    assert all(features[f"x/{i}"]["counts"] == [200] * 10 for i in range(10))  # equal reference mass
    assert features["x/9"]["edges"][5] != features["x/0"]["edges"][5]  # per feature, not pooled
    sketch = roundtrip(reference)
    again = sketch.count({"x": x})
    assert all(again[name].tolist() == features[name]["counts"] for name in again)


def test_a_shift_in_one_feature_moves_only_that_feature_s_counts() -> None:
    x = RNG.standard_normal((5000, 10))
    sketch = roundtrip(build_reference({"x": x}, {"y": x[:, :1]}))
    live = RNG.standard_normal((1000, 10))
    live[:, 3] += 1.0
    counts = sketch.count({"x": live})
    assert counts["x/3"][-3:].sum() > 2 * counts["x/0"][-3:].sum()
    assert abs(int(counts["x/0"][-3:].sum()) - 300) < 60  # an unshifted feature keeps its share


def test_counts_from_many_devices_add_up_exactly() -> None:
    x = RNG.standard_normal((3000, 5))
    sketch = roundtrip(build_reference({"x": x}, {"y": x}))
    whole = sketch.count({"x": x, "y": x})
    parts = [sketch.count({"x": part, "y": part}) for part in np.array_split(x, 7)]
    assert all((sum(p[name] for p in parts) == whole[name]).all() for name in whole)


def test_images_get_seeded_projections_and_channel_means() -> None:
    images = RNG.random((400, 3, 16, 16)).astype(np.float32)
    reference = build_reference({"image": images}, {"embedding": RNG.standard_normal((400, 384))})
    names = [f["name"] for f in reference["features"]]
    assert [n for n in names if n.startswith("image/channel/")] == [f"image/channel/{c}" for c in range(3)]
    assert sum(n.startswith("image/proj/") for n in names) == 16
    assert sum(n.startswith("embedding/proj/") for n in names) == 16
    assert reference["projections"]["image"]["elements"] == 3 * 16 * 16 and reference["channel_axes"] == {"image": 1}
    sketch = roundtrip(reference)  # the projections come back from the seed alone
    counts = sketch.count({"image": images})
    assert all(counts[f["name"]].tolist() == f["counts"] for f in reference["features"] if f["tensor"] == "image")
    darker = sketch.count({"image": images[:200] * [[[0.5]], [[1.0]], [[1.0]]]})
    assert darker["image/channel/0"][0] > 150 and darker["image/channel/1"][0] < 60  # one channel changed


def test_classifier_outputs_get_class_counts_and_a_confidence_histogram() -> None:
    logits = RNG.standard_normal((1000, 4)) + np.array([2.0, 0.0, 0.0, 0.0])
    labels = RNG.integers(0, 3, (1000, 1))
    reference = build_reference({"x": logits}, {"scores": logits, "label": labels})
    features = {f["name"]: f for f in reference["features"]}
    assert features["scores/class"]["counts"] == np.bincount(logits.argmax(1), minlength=4).tolist()
    assert features["label/class"]["counts"] == np.bincount(labels[:, 0], minlength=3).tolist()
    sketch = roundtrip(reference)
    flipped = sketch.count({"scores": logits[:, ::-1]})
    assert flipped["scores/class"][3] == features["scores/class"]["counts"][0]
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    confident = sketch.count({"scores": logits})["scores/confidence"]
    assert confident.tolist() == sketch.count({"scores": np.log(probabilities)})["scores/confidence"].tolist()


def test_a_constant_feature_still_shows_a_change() -> None:
    x = np.zeros((500, 2))
    x[:, 1] = RNG.standard_normal(500)
    sketch = roundtrip(build_reference({"x": x}, {"y": x[:, 1:]}))
    assert sketch.count({"x": x})["x/0"].tolist() == [0, 500, 0]
    assert sketch.count({"x": x + 0.1})["x/0"].tolist() == [0, 0, 500]
    assert sketch.count({"x": x - 0.1})["x/0"].tolist() == [500, 0, 0]


def test_a_version_1_reference_is_read_as_one_pooled_histogram_per_tensor(tmp_path: Path) -> None:
    edges = [0.0, 1.0, 2.0, 3.0]
    old = {"schema": "edgefed.reference/1", "inputs": {"x": {"histogram": {"edges": edges, "counts": [1, 2, 3]}}},
           "outputs": {}, "top1": []}  # fmt: skip
    (tmp_path / "reference.json").write_text(json.dumps(old))
    sketch = Sketch.load(tmp_path)
    assert sketch is not None and [f.name for f in sketch.features] == ["x"]
    assert sketch.count({"x": np.array([[0.5, 1.5, 2.5, 9.0]])})["x"].tolist() == [1, 1, 2]
    assert Sketch.load(tmp_path / "missing") is None


def test_strings_and_non_finite_values_have_no_features_but_do_not_break_the_reference() -> None:
    x = RNG.standard_normal((100, 2))
    x[:10, 0] = np.nan
    reference = build_reference({"x": x, "text": np.array([["a"]] * 100)}, {"y": x[:, 1:]})
    assert {f["tensor"] for f in reference["features"]} == {"x", "y"}
    assert all(np.isfinite(f["edges"]).all() for f in reference["features"])


def test_samples_with_another_number_of_elements_are_skipped_never_counted_in_part() -> None:
    x = RNG.standard_normal((500, 8))
    images = RNG.random((200, 3, 20, 20))
    sketch = roundtrip(build_reference({"x": x, "image": images}, {"y": RNG.standard_normal((500, 1))}))
    for shorter_or_longer in (x[:50, :5], np.hstack([x[:50], x[:50, :2]]), x[:50].reshape(50, 2, 4)[:, :1]):
        assert sketch.count({"x": shorter_or_longer}) == {}  # no IndexError, and no prefix counted
    assert sketch.count({"image": images[:10, :, :10]}) == {}  # a projection needs its elements
    assert sketch.count({"image": images[:10].reshape(10, 4, 10, 30)}) == {}  # same elements, other channels
    counts = sketch.count({"x": x[:50, :5], "image": images[:10]})  # a tensor that fits is still counted
    assert set(counts) == {f.name for f in sketch.features_of("image")}
    assert all(c.sum() == 10 for c in counts.values())
