"""Supervised training on labels only: cross-entropy on weak views (the baseline every method is compared to)."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..data.loader import Batch
from ..models.heads import Classifier
from .base import Method, Progress


class Supervised(Method):
    backbone_prefix = "net.backbone."
    head_prefix = "net.head."

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        super().__init__(cfg, info)
        self.net = Classifier(backbone, info.num_classes)

    def get_backbone(self) -> nn.Module:
        return self.net.backbone

    def head_modules(self) -> list[nn.Module]:
        return [self.net.head]

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        logits = self.net(self.weak_view(batch.x))
        loss = F.cross_entropy(logits, batch.y, label_smoothing=self.cfg.label_smoothing)
        return {"loss": loss}

    def ema_target(self) -> nn.Module:
        return self.net

    def classifier(self, ema: Optional[nn.Module] = None) -> nn.Module:
        return ema if ema is not None else self.net

    def head(self) -> nn.Linear:
        return self.net.head
