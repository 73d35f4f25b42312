"""FixMatch's pseudo-label consistency loss."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_2d, check_same


def fixmatch_loss(logits_weak: Tensor, logits_strong: Tensor, threshold: float = 0.95,
                  weights: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Pseudo-label = argmax softmax(logits_weak) (no gradient); mask = max prob ≥ threshold (float (N,)).
    loss = mean over all N of CE(logits_strong, pseudo-label) · mask. `weights` (N,), if given, replaces the mask
    in the loss (soft weighting, SoftMatch). logits: (N, K). -> (loss scalar, mask (N,))."""
    check_2d("logits_weak", logits_weak)
    check_2d("logits_strong", logits_strong)
    check_same("logits_weak", logits_weak, "logits_strong", logits_strong)
    if not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    with torch.no_grad():
        probs = torch.softmax(logits_weak.detach().float(), dim=1)
        confidence, pseudo = probs.max(dim=1)
        mask = (confidence >= threshold).float()
    weight = mask if weights is None else weights.detach().float()
    if weight.shape != mask.shape:
        raise ValueError(f"weights must have shape {tuple(mask.shape)}, got {tuple(weight.shape)}")
    loss = (F.cross_entropy(logits_strong.float(), pseudo, reduction="none") * weight).mean()
    return loss, mask
