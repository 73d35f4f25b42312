"""SupCon (Khosla et al. 2020): supervised contrastive pretraining for labeled data. Two views of every image, a
projector, and `supcon_loss` (L_out): each view's positives are its other view and every view of the images with the
same label in the (global) batch. Images whose label is unknown (-1, e.g. an unlabeled image tree) keep only their own
other view as positive, which is SimCLR for them."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..data.loader import Batch
from ..losses import SupConLoss
from ..models.heads import mlp
from .base import Progress
from .contrastive import ContrastiveConfig, ContrastiveMethod
from .registry import register


class SupConConfig(ContrastiveConfig):
    """SupCon with the paper's defaults (τ 0.1, projector 2048 → 128); trains on the labeled images."""

    method: Literal["supcon"]

    recommended = {"optimizer": {"name": "sgd", "lr": 0.5, "lr_scaling": "linear", "base_batch_size": 1024, "weight_decay": 0.0001, "momentum": 0.9}, "schedule": {"name": "cosine", "warmup_epochs": 10, "warmup_start": 0.1}}
    recommended_source = ("SupCon reference (HobbitLong/SupContrast, main_supcon.py): SGD momentum 0.9, lr 0.5 at batch 1024 (scaled linearly), weight decay 1e-4, 10 warm-up epochs from lr/10, cosine")
    temperature: float = Field(0.1, gt=0, description="softmax temperature of the supervised contrastive loss")
    proj_hidden_dim: int = Field(2048, ge=1)
    proj_dim: int = Field(128, ge=1)


@register("supcon", SupConConfig)
class SupCon(ContrastiveMethod):
    """backbone -> 2-layer MLP projector -> SupConLoss over the 2 views of the batch with its labels."""

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        super().__init__(cfg, backbone, info)
        self.projector = mlp(backbone.num_features, cfg.proj_hidden_dim, cfg.proj_dim, layers=2)
        self.loss_fn = SupConLoss(cfg.temperature)

    def head_modules(self) -> list[nn.Module]:
        return [self.probe, self.projector]

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        x1, x2 = self.augment_views(batch)
        features = self.backbone(torch.cat([x1, x2]))
        z1, z2 = self.projector(features).chunk(2)
        loss = self.loss_fn(torch.stack([z1, z2], dim=1), batch.y)
        probe = self.probe_loss(features, batch.y.repeat(2))
        return {"loss": loss + probe, "supcon_loss": loss.detach(), "probe_loss": probe.detach()}
