"""PNG pictures of an evaluation (matplotlib, Agg backend: no display needed).

  block_density(...)        bar chart: mean fraction of gates on, per gated block
  class_channel_heatmap(...) class x channel mean gate of one block
  macs_histogram(...)       histogram of per-example MACs, with dense MACs marked
  accuracy_macs_plane(...)  several runs on the accuracy-vs-MACs plane
"""
from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fgc_jax import storage  # noqa: E402


def _save(fig, path: str) -> str:
    """Writes `fig` as a PNG to `path` (a local path or gs:// URL); returns `path`."""
    target = storage.path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    storage.write_with(target, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return path


def block_density(density: Sequence[float], path: str, fgc_blocks: Sequence[int] = (),
                  title: str = "") -> str:
    """Bar per gated block of its mean gate density; FGC blocks in a second colour."""
    density = np.asarray(density, np.float64)
    fgc = set(fgc_blocks)
    colours = ["tab:orange" if b in fgc else "tab:blue" for b in range(len(density))]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(density) + 2), 3.2))
    ax.bar(np.arange(len(density)), density, color=colours)
    ax.set_xticks(np.arange(len(density)))
    ax.set_xlabel("gated block")
    ax.set_ylabel("mean fraction of gates on")
    ax.set_ylim(0, 1)
    if fgc:
        from matplotlib.patches import Patch
        ax.legend(handles=[Patch(color="tab:blue", label="other gated blocks"),
                           Patch(color="tab:orange", label="FGC blocks")], loc="upper left")
    ax.set_title(title or "Gate density per block")
    return _save(fig, path)


def class_channel_heatmap(gates: np.ndarray, labels: np.ndarray, num_classes: int, path: str,
                          title: str = "", class_names: Sequence[str] | None = None) -> str:
    """Mean hard gate of each channel over each class's examples ([classes, channels] image).

    Channels are ordered by overall density so shared and class-specific channels separate.
    """
    gates = np.asarray(gates, np.float64)
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    sums = np.zeros((num_classes, gates.shape[1]))
    np.add.at(sums, labels, gates)
    mean = sums / np.maximum(counts, 1)[:, None]
    order = np.argsort(-gates.mean(axis=0), kind="stable")
    height = min(12.0, 0.25 * num_classes + 1.8)
    fig, ax = plt.subplots(figsize=(max(5.0, min(16.0, 0.08 * gates.shape[1] + 2)), height))
    im = ax.imshow(mean[:, order], aspect="auto", cmap="viridis", vmin=0, vmax=1,
                   interpolation="nearest")
    ax.set_xlabel("channel (sorted by overall density)")
    ax.set_ylabel("class")
    if class_names is not None and num_classes <= 20:
        ax.set_yticks(np.arange(num_classes), class_names)
    fig.colorbar(im, ax=ax, label="mean gate")
    ax.set_title(title or "Mean gate per class and channel")
    return _save(fig, path)


def macs_histogram(macs: np.ndarray, dense_macs: float, path: str, title: str = "") -> str:
    """Histogram of per-example MACs (in millions), dense and mean MACs marked."""
    macs = np.asarray(macs, np.float64) / 1e6
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.hist(macs, bins=50, color="tab:blue")
    ax.axvline(macs.mean(), color="tab:green", linestyle="-", label=f"mean {macs.mean():.2f}M")
    ax.axvline(dense_macs / 1e6, color="tab:red", linestyle="--", label=f"dense {dense_macs / 1e6:.2f}M")
    ax.set_xlabel("MACs per example (millions)")
    ax.set_ylabel("examples")
    ax.legend()
    ax.set_title(title or "Per-example MACs")
    return _save(fig, path)


def accuracy_macs_plane(names: Sequence[str], macs: Sequence[float], top1: Sequence[float],
                        path: str, dense_macs: Sequence[float] | None = None) -> str:
    """Each run as a point (MACs in millions, top-1 %), labelled by name."""
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.asarray(macs, np.float64) / 1e6
    y = 100 * np.asarray(top1, np.float64)
    ax.scatter(x, y, color="tab:blue", zorder=3)
    for name, xi, yi in zip(names, x, y):
        ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if dense_macs is not None:
        for i, d in enumerate(sorted(set(float(v) for v in dense_macs))):
            ax.axvline(d / 1e6, color="tab:red", linestyle="--", linewidth=0.8,
                       label="dense MACs" if i == 0 else None)
        ax.legend(loc="lower right")
    ax.set_xlabel("mean MACs per example (millions)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.set_title("Accuracy vs MACs")
    return _save(fig, path)
