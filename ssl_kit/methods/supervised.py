"""Supervised training on labels only: cross-entropy on weak views (the baseline every method is compared to), with
label smoothing and mixup / CutMix options; also the fine-tuning stage (with ViT layer-wise lr decay)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.loader import Batch
from .base import ClassifierMethod, Progress


def mix_batch(x: Tensor, mixup_alpha: float, cutmix_alpha: float) -> tuple[Tensor, Tensor, float]:
    """Mixup (convex blend) or CutMix (pasted box) with a random partner of each image.
    x (N, C, H, W) -> (mixed x, partner permutation (N,), λ = weight of the original labels)."""
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or torch.rand(()).item() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0], device=x.device)
    if not use_cutmix:
        return lam * x + (1 - lam) * x[perm], perm, lam
    h, w = x.shape[-2:]
    cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
    cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    mixed = x.clone()
    mixed[:, :, top:bottom, left:right] = x[perm][:, :, top:bottom, left:right]
    lam = 1 - (bottom - top) * (right - left) / (h * w)
    return mixed, perm, lam


class Supervised(ClassifierMethod):
    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        x = self.weak_view(batch.x)
        if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
            x, perm, lam = mix_batch(x, cfg.mixup_alpha, cfg.cutmix_alpha)
            logits = self.net(x)
            loss = lam * F.cross_entropy(logits, batch.y, label_smoothing=cfg.label_smoothing) + \
                (1 - lam) * F.cross_entropy(logits, batch.y[perm], label_smoothing=cfg.label_smoothing)
            return {"loss": loss}
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, batch.y, label_smoothing=cfg.label_smoothing)}
