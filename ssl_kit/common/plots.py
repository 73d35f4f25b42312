"""Pictures (matplotlib, Agg backend) for the report and for the methods' own diagnostics: training curves,
confusion matrix, pseudo-label quantity and quality, reconstructions, t-SNE, per-domain bars."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np


@functools.cache
def pyplot():
    """matplotlib.pyplot on the Agg backend, imported by the first picture drawn: importing this module stays cheap,
    so the layers above import it at module level."""
    import matplotlib  # deferred: heavy optional import (matplotlib), only when a picture is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: heavy optional import (matplotlib), as above

    return plt


def read_metrics(path: Path) -> list[dict]:
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_training_curves(records: list[dict], out: Path) -> Path | None:
    """Loss per step, one line per stage."""
    steps = [r for r in records if r.get("kind") == "step" and isinstance(r.get("loss"), (int, float))]
    if not steps:
        return None
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    for stage in dict.fromkeys(r["stage"] for r in steps):
        points = [(r["step"], r["loss"]) for r in steps if r["stage"] == stage]
        ax.plot(*zip(*points), label=stage)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if all(r["loss"] > 0 for r in steps):  # SimSiam/BYOL-style losses are negative: linear axis then
        ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, out)


def plot_confusion(confusion: list[list[int]], classes: list[str], title: str, out: Path) -> Path:
    fig, ax = pyplot().subplots(figsize=(4.5, 4))
    image = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90 if len(classes) > 10 else 0, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return save_figure(fig, out)


def plot_pseudo_labels(records: list[dict], stage: str, out: Path) -> Path | None:
    """Mask rate (quantity) and masked pseudo-label accuracy (quality) per epoch."""
    epochs = [r for r in records if r.get("stage") == stage and r.get("kind") == "epoch" and "pseudo/mask_rate" in r]
    if not epochs:
        return None
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    x = [r["epoch"] + 1 for r in epochs]
    ax.plot(x, [r["pseudo/mask_rate"] for r in epochs], marker="o", label="quantity: mask rate")
    ax.plot(x, [r["pseudo/accuracy"] if isinstance(r["pseudo/accuracy"], float) else float("nan") for r in epochs],
            marker="s", label="quality: accuracy of masked pseudo-labels")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title(f"{stage}: pseudo-labels")
    return save_figure(fig, out)


def plot_threshold_sweep(thresholds: list[float], quantity: list[float], quality: list[float], out: Path) -> Path:
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    ax.plot(thresholds, quantity, marker="o", label="quantity: fraction above threshold")
    ax.plot(thresholds, quality, marker="s", label="quality: accuracy of those pseudo-labels")
    ax.set_xlabel("confidence threshold")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, out)


def plot_reconstructions(rows: list, titles: list[str], out: Path) -> Path:
    """rows: tensors (N, C, H, W) in [0, 1], one figure row each (MAE: original, masked, reconstruction)."""
    n = rows[0].shape[0]
    fig, axes = pyplot().subplots(len(rows), n, figsize=(1.2 * n, 1.3 * len(rows)), squeeze=False)
    for r, (images, title) in enumerate(zip(rows, titles)):
        for c in range(n):
            image = images[c].permute(1, 2, 0).numpy()
            axes[r][c].imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            axes[r][c].axis("off")
        axes[r][0].set_title(title, fontsize=8, loc="left")
    return save_figure(fig, out)


def tsne_embedding(features, seed: int = 0):
    """features (N, F) -> 2-D t-SNE coordinates (N, 2) (PCA to ≤ 50 dims first, as is usual)."""
    # deferred: heavy optional import (scikit-learn, ~1 s), only for t-SNE pictures
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE  # deferred: as above

    x = np.asarray(features, dtype=np.float32)
    if x.shape[1] > 50 and x.shape[0] > 50:
        x = PCA(50, random_state=seed).fit_transform(x)
    perplexity = float(min(30, max(2, (x.shape[0] - 1) // 3)))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def plot_tsne(points, labels: list[int], classes: list[str], out: Path, domains: list[str] | None = None,
              domain_names: list[str] | None = None, title: str = "t-SNE of features") -> Path:
    """points (N, 2); labels (N,) class indices; optional domains (N,) indices into domain_names: a second panel
    coloured by domain."""
    panels = 2 if domains is not None else 1
    fig, axes = pyplot().subplots(1, panels, figsize=(5 * panels, 4.5), squeeze=False)
    ax = axes[0][0]
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10" if len(classes) <= 10 else "tab20",
                         s=6, alpha=0.8)
    handles, _ = scatter.legend_elements(num=len(classes))
    ax.legend(handles, classes[:len(handles)], fontsize=6, markerscale=0.7, title="class", loc="best")
    ax.set_title(f"{title}: by class")
    if domains is not None:
        ax = axes[0][1]
        for index, name in enumerate(domain_names):
            chosen = [i for i, d in enumerate(domains) if d == index]
            ax.scatter(points[chosen, 0], points[chosen, 1], s=6, alpha=0.6, label=name)
        ax.legend(fontsize=7, markerscale=1.5, title="domain")
        ax.set_title(f"{title}: by domain")
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, out)


def plot_domain_bars(rows: dict[str, dict[str, float]], out: Path, title: str = "accuracy per domain") -> Path:
    """rows: {domain: {series name: top-1}} -> grouped bars, one group per domain, one bar per series."""
    domains = list(rows)
    series = list(dict.fromkeys(k for row in rows.values() for k in row))
    width = 0.8 / max(1, len(series))
    fig, ax = pyplot().subplots(figsize=(max(5, 1.3 * len(domains) + 2), 3.8))
    for i, name in enumerate(series):
        xs = [d + (i - (len(series) - 1) / 2) * width for d in range(len(domains))]
        values = [rows[d].get(name, float("nan")) for d in domains]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks(range(len(domains)), domains, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, out)


def save_figure(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    pyplot().close(fig)
    return out
