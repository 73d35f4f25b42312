"""FixMatch (Sohn et al. 2020): the weak view of an unlabeled image gives a pseudo-label (no gradient), the strong
view is trained towards it where the policy is confident. Thresholding policies live in thresholds.py; pseudo-label
quantity (mask rate) and quality (accuracy against the hidden labels) are tracked per class (semi.py)."""
from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..data.loader import Batch
from ..losses import consistency_loss
from .base import Progress
from .registry import register
from .semi import USB_SGD
from .weak_strong import GatedConfig, WeakStrongMethod


class FixMatchConfig(GatedConfig):
    method: Literal["fixmatch"]

    recommended = USB_SGD
    recommended_source = ("FixMatch (Sohn et al. 2020, §4): SGD Nesterov momentum 0.9, lr 0.03 (no batch scaling), weight decay 5e-4, lr · cos(7πk/16K)")
    threshold: float = Field(0.95, ge=0, le=1)
    temperature: float = Field(1.0, gt=0, description="sharpening of the pseudo-label softmax")


@register("fixmatch", FixMatchConfig)
class FixMatch(WeakStrongMethod):
    """FixMatch: the weak view's confident prediction is the target of the strong view (swappable threshold policies:
    fixed, FlexMatch, FreeMatch, SoftMatch, relative; optional distribution alignment)."""

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        logits_x, logits_w, logits_s = self.forward_views(*self.views(batch))
        supervised = F.cross_entropy(logits_x.float(), batch.y)
        probs, weights = self.gated_pseudo_labels(logits_x, logits_w, batch, cfg.temperature)
        unsupervised = consistency_loss(logits_s, probs.argmax(dim=1), weights)
        out = {"supervised_loss": supervised.detach(), "unsupervised_loss": unsupervised.detach(),
               "mask_rate": (weights > 0.5).float().mean()}
        return self.finish(supervised + cfg.lambda_u * unsupervised, out, logits_s, weights)
