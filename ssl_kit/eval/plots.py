"""Pictures for the report (matplotlib, Agg backend): training curves, confusion matrix, pseudo-label quantity
and quality per epoch."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for stage in dict.fromkeys(r["stage"] for r in steps):
        points = [(r["step"], r["loss"]) for r in steps if r["stage"] == stage]
        ax.plot(*zip(*points), label=stage)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_confusion(confusion: list[list[int]], classes: list[str], title: str, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    image = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90 if len(classes) > 10 else 0, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, out)


def plot_pseudo_labels(records: list[dict], stage: str, out: Path) -> Path | None:
    """Mask rate (quantity) and masked pseudo-label accuracy (quality) per epoch."""
    epochs = [r for r in records if r.get("stage") == stage and r.get("kind") == "epoch" and "pseudo/mask_rate" in r]
    if not epochs:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [r["epoch"] + 1 for r in epochs]
    ax.plot(x, [r["pseudo/mask_rate"] for r in epochs], marker="o", label="quantity: mask rate")
    ax.plot(x, [r["pseudo/accuracy"] if isinstance(r["pseudo/accuracy"], float) else float("nan") for r in epochs],
            marker="s", label="quality: accuracy of masked pseudo-labels")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title(f"{stage}: pseudo-labels")
    return _save(fig, out)


def plot_threshold_sweep(thresholds: list[float], quantity: list[float], quality: list[float], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(thresholds, quantity, marker="o", label="quantity: fraction above threshold")
    ax.plot(thresholds, quality, marker="s", label="quality: accuracy of those pseudo-labels")
    ax.set_xlabel("confidence threshold")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_reconstructions(rows: list, titles: list[str], out: Path) -> Path:
    """rows: tensors (N, C, H, W) in [0, 1], one figure row each (MAE: original, masked, reconstruction)."""
    n = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.2 * n, 1.3 * len(rows)), squeeze=False)
    for r, (images, title) in enumerate(zip(rows, titles)):
        for c in range(n):
            image = images[c].permute(1, 2, 0).numpy()
            axes[r][c].imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            axes[r][c].axis("off")
        axes[r][0].set_title(title, fontsize=8, loc="left")
    return _save(fig, out)


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
