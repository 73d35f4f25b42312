"""Masked image modeling loss (MAE)."""
from __future__ import annotations

from torch import Tensor


def mae_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = True) -> Tensor:
    """pred, target: (N, L, P) patches; mask: (N, L), 1 = masked. With norm_pix each target patch is normalised by
    its own mean and (unbiased) variance: (t − mean) / sqrt(var + 1e-6). Per-patch MSE averaged over P, then
    averaged over masked patches only. -> scalar."""
    if pred.ndim != 3 or pred.shape != target.shape:
        raise ValueError(f"pred and target must both be (N, L, P), got {tuple(pred.shape)} and {tuple(target.shape)}")
    if mask.shape != pred.shape[:2]:
        raise ValueError(f"mask must be (N, L) = {tuple(pred.shape[:2])}, got {tuple(mask.shape)}")
    if float(mask.sum()) <= 0:
        raise ValueError("mask has no masked patch (all zeros): the MAE loss is undefined")
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum()
