"""A 284k-parameter CNN for scikit-learn's bundled 8x8 digits, trained in seconds on a CPU.

``python digits.py [DIR]`` trains it and writes ``digits_cnn.pt``, ``calib.npz`` and ``val.npz`` into DIR
(default: the working directory). ``trained()`` is the factory the compiler calls (``digits.py:trained``);
it loads the weights that
``train()`` saved (``$DIGITS_WEIGHTS``, default ``digits_cnn.pt`` in the working directory).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train/held-out split of the digits, as float32 NCHW in [0, 1]."""
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None, :, :]
    x_train, x_test, y_train, y_test = train_test_split(x, data.target, test_size=0.3, random_state=seed)
    return x_train, x_test, y_train, y_test


def train(workdir: Path, epochs: int = 12, seed: int = 0) -> float:
    """Train, save weights and calib/val .npz files into ``workdir``; returns held-out accuracy."""
    torch.manual_seed(seed)
    x_train, x_test, y_train, y_test = digits_split(seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train).long()
    for _ in range(epochs):
        for i in torch.randperm(len(xt)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xt[i]), yt[i]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    workdir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), workdir / "digits_cnn.pt")
    np.savez(workdir / "calib.npz", x=x_train[:256])
    np.savez(workdir / "val.npz", x=x_test, y=y_test)
    return accuracy


def trained() -> DigitsCNN:
    model = DigitsCNN()
    weights = Path(os.environ.get("DIGITS_WEIGHTS", "digits_cnn.pt"))
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


if __name__ == "__main__":  # python examples/quickstart/digits.py [DIR]: train and write the tour's files
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    print(f"held-out accuracy {train(target):.3f}; wrote digits_cnn.pt, calib.npz and val.npz in {target}")
