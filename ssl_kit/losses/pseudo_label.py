"""Pseudo-label consistency: the loss FixMatch and its successors (FlexMatch, FreeMatch, SoftMatch, AdaMatch, Dash,
UDA-style soft targets) train the strong view with, and FixMatch's thresholded form of it."""
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


def consistency_loss(logits: Tensor, targets: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """Weighted cross-entropy of `logits` (N, K) towards `targets`: hard pseudo-labels (N,) int64 or soft target
    distributions (N, K) (rows summing to 1). Targets and weights get no gradient. `weights` (N,) (a threshold mask,
    SoftMatch's soft weights; None = all 1) multiply each sample's loss; the mean is over all N samples, so masked-out
    samples count as zeros (FixMatch's convention). -> scalar."""
    check_2d("logits", logits)
    n, k = logits.shape
    targets = targets.detach()
    if targets.ndim == 1:
        if targets.shape[0] != n or targets.dtype != torch.long:
            raise ValueError(f"hard targets must be int64 of shape ({n},), got {targets.dtype} {tuple(targets.shape)}")
        per_sample = F.cross_entropy(logits.float(), targets, reduction="none")
    elif targets.shape == (n, k):
        per_sample = -(targets.float() * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
    else:
        raise ValueError(f"targets must be labels ({n},) or distributions ({n}, {k}), got {tuple(targets.shape)}")
    if weights is None:
        return per_sample.mean()
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {tuple(weights.shape)}")
    return (per_sample * weights.detach().float()).mean()
