"""Supervised training on labels only: cross-entropy on weak views (the baseline every method is compared to), with
label smoothing and mixup / CutMix options; also the fine-tuning stage (with ViT layer-wise lr decay)."""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..config import StageBase
from ..data.loader import Batch
from .base import ClassifierMethod, Progress, require_vit
from .registry import register


class SupervisedConfig(StageBase):
    """Labels only; also the fine-tuning stage (init.from_stage / init.checkpoint)."""

    method: Literal["supervised"]

    recommended = {"optimizer": {"name": "sgd", "lr": 0.1, "lr_scaling": "linear", "base_batch_size": 256, "weight_decay": 0.0005, "momentum": 0.9}, "schedule": {"name": "cosine", "warmup_epochs": 0}}
    recommended_source = ("the supervised ResNet baseline (Goyal et al. 2017 linear scaling): SGD momentum 0.9, lr 0.1 × batch/256, weight decay 5e-4 (the CIFAR ResNet value), cosine decay")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    mixup_alpha: float = Field(0.0, ge=0, description="mixup Beta(α, α); 0 = off")
    cutmix_alpha: float = Field(0.0, ge=0, description="CutMix Beta(α, α); 0 = off (with both, each batch picks one)")
    layer_decay: Optional[float] = Field(None, gt=0, le=1, description="ViT layer-wise lr decay (MAE fine-tuning 0.65)")


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


@register("supervised", SupervisedConfig)
class Supervised(ClassifierMethod):
    """Cross-entropy on weak views of labeled images (the baseline every method is compared with)."""

    def __init__(self, cfg, backbone, info) -> None:
        if cfg.layer_decay is not None:  # else a CNN would silently train without it
            require_vit(cfg.name, backbone, "layer_decay",
                        "its learning rates are decayed block by block from the ViT's last block; remove it for a CNN")
        super().__init__(cfg, backbone, info)

    def layer_decay(self) -> Optional[float]:
        return self.cfg.layer_decay

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
