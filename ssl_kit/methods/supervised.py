"""Supervised training on labels only: cross-entropy on weak views (the baseline every method is compared to)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..data.loader import Batch
from .base import ClassifierMethod, Progress


class Supervised(ClassifierMethod):
    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        logits = self.net(self.weak_view(batch.x))
        loss = F.cross_entropy(logits, batch.y, label_smoothing=self.cfg.label_smoothing)
        return {"loss": loss}
