"""Classification metrics from logits and batched inference over an ImageSet."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


def classification_metrics(logits: Tensor, labels: Tensor, num_classes: int) -> dict:
    """logits (N, K), labels (N,) -> top1, top5 (fractions), balanced accuracy, per-class accuracy, confusion (K×K,
    rows = true class)."""
    labels = labels.cpu()
    logits = logits.float().cpu()
    predictions = logits.argmax(1)
    k = min(5, logits.shape[1])
    top5 = (logits.topk(k, dim=1).indices == labels.unsqueeze(1)).any(1).float().mean().item()
    confusion = torch.bincount(labels * num_classes + predictions, minlength=num_classes ** 2).view(num_classes, num_classes)
    support = confusion.sum(1)
    per_class = torch.where(support > 0, confusion.diag().float() / support.clamp_min(1), torch.full_like(support, float("nan"), dtype=torch.float))
    present = support > 0
    return {
        "top1": (predictions == labels).float().mean().item(),
        "top5": top5,
        "balanced_accuracy": per_class[present].mean().item(),
        "per_class": [round(v, 6) if v == v else None for v in per_class.tolist()],
        "confusion": confusion.tolist(),
    }


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, transform: Callable[[Tensor], Tensor], device: torch.device,
            batch_size: int = 512) -> Tensor:
    """Run `model` in eval mode over uint8 images (N, C, H, W) in batches. -> outputs (N, ...) on the CPU."""
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start:start + batch_size].to(device, non_blocking=True)
        outputs.append(model(transform(chunk)).float().cpu())
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)
