"""Pictures of a drift report: for each drifting feature, reference vs live histograms, and the scores
over time (matplotlib, Agg backend); PNG, or an HTML page with the PNG inside (self-contained)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.protocol.atomic import atomic_write_bytes

MAX_FEATURES = 6


def _figure(report: dict[str, Any], features: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [f for f in report["features"] if f.get("live")][:features]
    rows = 1 + max(1, (len(shown) + 1) // 2)
    fig = plt.figure(figsize=(12, 3.2 * rows))
    timeline = fig.add_subplot(rows, 1, 1)
    _timeline(timeline, report, [f["name"] for f in shown])
    for i, feature in enumerate(shown):
        _histograms(fig.add_subplot(rows, 2, 3 + i), feature)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def _timeline(axes: Any, report: dict[str, Any], names: list[str]) -> None:
    windows = report["windows"]
    x = np.arange(len(windows))
    axes.plot(x, [w["combined"] / max(w["threshold"], 1e-9) for w in windows], label="combined", color="black")
    for name in names:
        axes.plot(x, [w["scores"].get(name, np.nan) for w in windows], label=name, alpha=0.7)
    axes.axhline(1.0, color="red", linestyle="--", label="alarm threshold")
    for i in np.flatnonzero([w["alarm"] for w in windows]):
        axes.axvline(i, color="red", alpha=0.2)
    axes.set(title=f"{report['model']}@{report['version']} ({report['scope']}): score over windows "
                   "(CUSUM / threshold)", xlabel="window", ylabel="score")  # fmt: skip
    axes.legend(fontsize=7, ncol=4)


def _histograms(axes: Any, feature: dict[str, Any]) -> None:
    reference = np.asarray(feature["reference"], np.float64)
    live = np.asarray(feature["live"], np.float64)
    bins = np.arange(len(reference))
    axes.bar(bins - 0.2, reference / max(reference.sum(), 1), width=0.4, label="reference")
    axes.bar(bins + 0.2, live / max(live.sum(), 1), width=0.4, label="live")
    edges = feature["edges"]
    axes.set_xticks(bins, [f"{edges[i]:.3g}" for i in range(len(bins))], fontsize=6, rotation=45)
    psi = feature.get("psi")
    axes.set(title=f"{feature['name']}  score {feature['score']:.2f}" + (f"  PSI {psi:.3f}" if psi else ""),
             ylabel="share of samples")  # fmt: skip
    axes.legend(fontsize=7)


def write_plot(report: dict[str, Any], path: Path, features: int = MAX_FEATURES) -> None:
    """``path`` ending .png: the picture; .html: a page holding it and the feature table."""
    image = _figure(report, features)
    if path.suffix.lower() == ".png":
        atomic_write_bytes(path, image)
        return
    rows = "".join(f"<tr><td>{html.escape(f['name'])}</td><td>{f['score']:.3f}</td><td>{f.get('psi', 0):.4f}</td>"
                   f"<td>{f.get('js', 0):.4f}</td></tr>" for f in report["features"][:30])  # fmt: skip
    title = html.escape(f"drift report: {report['model']}@{report['version']} ({report['scope']})")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
            f"<h1>{title}</h1><img alt='drift plots' src='data:image/png;base64,{base64.b64encode(image).decode()}'>"
            f"<table border='1'><tr><th>feature</th><th>score</th><th>PSI</th><th>JS</th></tr>{rows}</table>"
            "</body></html>")  # fmt: skip
    atomic_write_bytes(path, page.encode())
