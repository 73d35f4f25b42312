"""Classification metrics from logits and batched inference over an ImageSet."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from .modes import eval_mode


class ClassificationTally:
    """Top-1/top-5 counts and the K×K confusion matrix (rows = true class) accumulated over chunks of
    (logits (n, K), labels (n,)), so a test set's N×K logits never need to be held at once."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.long)
        self.correct = self.top5_correct = self.count = 0

    def add(self, logits: Tensor, labels: Tensor) -> None:
        labels = labels.cpu()
        logits = logits.float().cpu()
        predictions = logits.argmax(1)
        k = min(5, logits.shape[1])
        self.top5_correct += int((logits.topk(k, dim=1).indices == labels.unsqueeze(1)).any(1).sum())
        self.correct += int((predictions == labels).sum())
        self.count += int(labels.shape[0])
        self.confusion += torch.bincount(labels * self.num_classes + predictions, minlength=self.num_classes ** 2)

    def result(self) -> dict:
        """top1, top5 (fractions), balanced accuracy, per-class accuracy (None for absent classes), confusion."""
        k = self.num_classes
        confusion = self.confusion.view(k, k)
        support = confusion.sum(1)
        per_class = torch.where(support > 0, confusion.diag().float() / support.clamp_min(1),
                                torch.full_like(support, float("nan"), dtype=torch.float))
        present = support > 0
        total = max(self.count, 1)
        return {
            "top1": self.correct / total,
            "top5": self.top5_correct / total,
            "balanced_accuracy": per_class[present].mean().item(),
            "per_class": [round(v, 6) if v == v else None for v in per_class.tolist()],
            "confusion": confusion.tolist(),
        }


MINORITY_FRACTION = 0.3  # the minority classes: the 30% of classes with the fewest labeled training images


def minority_recall(per_class: list, labeled_counts: Tensor) -> float | None:
    """Mean test recall of the minority classes: the ⌈0.3·K⌉ classes with the fewest labeled training images (ties
    by class index). per_class: K recalls (None: a class absent from the test set), labeled_counts (K,). None when
    every class has the same number of labeled images (no minority) or no minority class is in the test set."""
    counts = labeled_counts.long().cpu()
    if counts.numel() == 0 or bool((counts == counts[0]).all()):
        return None
    order = sorted(range(len(counts)), key=lambda c: (int(counts[c]), c))
    minority = order[:max(1, math.ceil(MINORITY_FRACTION * len(counts)))]
    recalls = [per_class[c] for c in minority if per_class[c] is not None]
    return sum(recalls) / len(recalls) if recalls else None


def classification_metrics(logits: Tensor, labels: Tensor, num_classes: int) -> dict:
    """logits (N, K), labels (N,) -> top1, top5 (fractions), balanced accuracy, per-class accuracy, confusion (K×K,
    rows = true class)."""
    tally = ClassificationTally(num_classes)
    tally.add(logits, labels)
    return tally.result()


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, transform: Callable[[Tensor], Tensor], device: torch.device,
            batch_size: int = 512) -> Tensor:
    """Run `model` in eval mode over uint8 images (N, C, H, W) in batches. -> outputs (N, ...) on the CPU."""
    outputs = []
    with eval_mode(model):
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start:start + batch_size].to(device, non_blocking=True)
            outputs.append(model(transform(chunk)).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0)
