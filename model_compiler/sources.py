"""Load a source model and data sets, and export to ONNX."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np

from model_compiler.errors import DataError, SourceError

INPUT_NAME, OUTPUT_NAME = "input", "output"


def load_function(spec: str) -> Any:
    """``path/to/file.py:name`` or ``package.module:name`` → that object (not called)."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise SourceError(f"{spec!r}: write it as path/to/file.py:name or module:name")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise SourceError(f"{spec!r}: file {path} not found")
            module_spec = importlib.util.spec_from_file_location(f"_edgefed_src_{path.stem}", path)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        return getattr(module, attr)
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"{spec!r} could not be loaded: {exc}") from exc


def load_factory(spec: str) -> Any:
    """``path/to/file.py:factory`` or ``package.module:factory`` → the object ``factory()`` returns."""
    try:
        factory = load_function(spec)
    except SourceError as exc:
        raise SourceError(f"source {exc}; a source is path/to/file.py:factory or module:factory") from None
    try:
        return factory()
    except Exception as exc:
        raise SourceError(f"source {spec!r}: the factory raised {type(exc).__name__}: {exc}") from exc


def load_data(spec: str | Path, role: str) -> tuple[np.ndarray | dict[str, np.ndarray], np.ndarray | None]:
    """``.npz`` (see load_npz) or ``file.py:function`` / ``module:function`` returning an iterable of
    batches: arrays, or dicts of named arrays (several inputs); batches are joined along axis 0."""
    text = str(spec)
    if text.endswith(".npz") or ":" not in text:
        return load_npz(text, role)
    try:
        batches = list(load_factory(text))
    except SourceError as exc:
        raise DataError(f"--{role} {text}: {exc}") from None
    if not batches:
        raise DataError(f"--{role} {text}: the callable yielded no batches")
    if isinstance(batches[0], dict):
        return {name: np.concatenate([np.asarray(b[name]) for b in batches]) for name in batches[0]}, None
    joined = np.concatenate([np.asarray(b) for b in batches])
    return (joined.astype(np.float32) if joined.dtype == np.float64 else joined), None


def load_npz(path: str | Path, role: str) -> tuple[np.ndarray | dict[str, np.ndarray], np.ndarray | None]:
    """An ``.npz`` with array ``x`` (a single-input model) or one array per input name (e.g. input_ids and
    attention_mask), and optionally ``y`` (labels)."""
    try:
        data = np.load(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"--{role} {path}: cannot read ({exc}); pass an .npz file with an array 'x'") from None
    arrays = {k: data[k] for k in data.files if k != "y"}
    if not arrays or any(a.ndim < 1 or len(a) == 0 for a in arrays.values()):
        raise DataError(f"--{role} {path}: no inputs (found {sorted(data.files)}); save them as np.savez(f, x=...)")
    arrays = {k: a.astype(np.float32) if a.dtype == np.float64 else a for k, a in arrays.items()}
    return (arrays["x"] if set(arrays) == {"x"} else arrays), data.get("y")


def export_source(source: str, example: np.ndarray | dict[str, np.ndarray], out: Path) -> None:
    """fp32 ONNX from an ONNX file (copied after a check), a torch.export program (``.pt2``, one input),
    or a PyTorch factory (``file.py:factory`` / ``module:factory``; several inputs are passed
    positionally in the data's order, named after its arrays)."""
    if source.endswith(".onnx"):
        _copy_onnx(Path(source), out)
    elif source.endswith(".pt2"):
        if isinstance(example, dict):
            raise DataError("a .pt2 program takes one input here: pass an .npz with an array 'x'")
        _export_program(Path(source), example, out)
    else:
        export_onnx(load_factory(source), example, out)


def _copy_onnx(path: Path, out: Path) -> None:
    try:
        import onnx

        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except FileNotFoundError:
        raise SourceError(f"source {path}: file not found") from None
    except Exception as exc:
        raise SourceError(f"source {path} is not a valid ONNX model: {exc}") from exc
    onnx.save(model, str(out))


def _export_program(path: Path, example: np.ndarray, out: Path) -> None:
    try:
        import torch

        program = torch.export.load(str(path))
        sample = torch.from_numpy(np.ascontiguousarray(example[:2]))
        torch.onnx.export(program, (sample,), str(out), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamo=True)  # fmt: skip
    except ImportError:
        raise SourceError("exporting .pt2 programs needs torch: pip install 'edgefed[compiler]'") from None
    except Exception as exc:
        raise SourceError(f"source {path}: ONNX export of the torch.export program failed: {exc}. Export it "
                          "with a dynamic batch axis and an example batch of 2 or more") from exc  # fmt: skip


def export_onnx(module: Any, example: np.ndarray | dict[str, np.ndarray], out: Path) -> None:
    """Export a torch module to ONNX (TorchScript exporter, opset 17): the batch axis is dynamic, and
    so is every axis of integer inputs (token ids, masks: the sequence length varies)."""
    try:
        import torch
    except ImportError:
        raise SourceError("exporting PyTorch models needs torch: pip install 'edgefed[compiler]'") from None
    if not isinstance(module, torch.nn.Module):
        raise SourceError(f"the factory returned {type(module).__name__}, not a torch.nn.Module")
    module.eval()
    named = example if isinstance(example, dict) else {INPUT_NAME: example}
    samples = tuple(torch.from_numpy(np.ascontiguousarray(a[:2])) for a in named.values())
    axes: dict[str, dict[int, str]] = {
        name: ({i: f"{name}_{i}" for i in range(a.ndim)} | {0: "batch"}) if a.dtype.kind in "iu" else {0: "batch"}
        for name, a in named.items()
    }
    try:
        torch.onnx.export(
            module, samples, str(out), input_names=list(named), output_names=[OUTPUT_NAME],
            dynamic_axes={**axes, OUTPUT_NAME: {0: "batch"}}, opset_version=17, dynamo=False,
        )  # fmt: skip
    except Exception as exc:
        shapes = {name: list(a.shape[1:]) for name, a in named.items()}
        raise SourceError(f"ONNX export failed: {exc}. Check that the model runs on inputs shaped like {shapes} "
                          "and uses exportable operators") from exc  # fmt: skip
