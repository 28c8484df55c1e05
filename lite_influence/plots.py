"""Detection-curve and per-layer bar charts of an audit (matplotlib, imported lazily)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import ndr


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Write to a temporary name and rename, like every other file this tool writes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def detection_curves(result, path: str | Path) -> Path:
    """One panel per aggregation: the detection curve of each group, random and perfect lines."""
    plt = _pyplot()
    aggs = list(dict.fromkeys(row["agg"] for row in result.table))
    fig, axes = plt.subplots(1, len(aggs), figsize=(4.2 * len(aggs), 3.8), sharey=True, squeeze=False)
    n = result.n
    x = np.arange(1, n + 1) / n
    for ax, agg in zip(axes[0], aggs):
        subset = "correct" if agg.endswith("-c") else "all"
        for row in (r for r in result.table if r["agg"] == agg and r["kind"] == "group"):
            ids = result.rankings[(row["scope"], agg.removesuffix("-c"), subset)][0]
            ax.plot(x, ndr.detection_curve(ids, result.noisy), label=f"{row['scope']} ({row['auc_ndr']:.2f})")
        m = int(result.noisy.sum())
        ax.plot(x, x, "k:", label="random")
        ax.plot(x, np.minimum(1, np.arange(1, n + 1) / m), "k--", label="perfect")
        ax.set_title(agg)
        ax.set_xlabel("fraction of training set inspected")
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("fraction of noisy examples found")
    return _save(fig, path)


def layer_bars(result, path: str | Path, metric: str = "auc_ndr") -> Path:
    """AUC-NDR (or an NDR level) of every single layer, one bar group per aggregation."""
    plt = _pyplot()
    rows = [r for r in result.table if r["kind"] == "layer"]
    layers = list(dict.fromkeys(r["scope"] for r in rows))
    aggs = list(dict.fromkeys(r["agg"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(layers) * len(aggs) / 2), 3.6))
    width = 0.8 / len(aggs)
    for j, agg in enumerate(aggs):
        values = [next(r[metric] for r in rows if r["scope"] == l and r["agg"] == agg) for l in layers]
        ax.bar(np.arange(len(layers)) + j * width, values, width, label=agg)
    ax.axhline(result.baselines["random"][metric], color="k", ls=":", label="random")
    if "training loss" in result.baselines:
        ax.axhline(result.baselines["training loss"][metric], color="tab:red", ls="--", label="training loss")
    ax.set_xticks(np.arange(len(layers)) + 0.4 - width / 2, layers, rotation=30)
    ax.set_ylabel(metric.upper().replace("_", "-"))
    ax.legend(fontsize=7)
    return _save(fig, path)
