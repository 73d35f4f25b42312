"""ReFixMatch (Nguyen & Yang 2023, "Boosting semi-supervised learning by bridging high and low-confidence
predictions"), as USB runs it (`refixmatch`) with the authors' form of its KL term: FixMatch's cross-entropy towards
the confident hard pseudo-labels, plus, on the rows below the threshold that FixMatch discards, a KL consistency
from the sharpened weak prediction softmax(weak / T) to the strong view (`refixmatch_low_confidence_loss`):
L = CE(labeled) + λ_u (L_u + L_low). Every unlabeled image trains every step."""
from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..data.loader import Batch
from ..losses import consistency_loss, refixmatch_low_confidence_loss, sharpen
from .base import Progress
from .registry import register
from .semi import USB_SGD
from .weak_strong import GatedConfig, WeakStrongMethod


class ReFixMatchConfig(GatedConfig):
    """ReFixMatch keys; defaults from USB's `refixmatch` (algorithm arguments and all its configs): p_cutoff 0.95,
    T 0.5, ulb_loss_ratio 1.0, hard_label True, uratio 7 (CIFAR)."""

    method: Literal["refixmatch"]

    recommended = USB_SGD
    recommended_source = ("USB's ReFixMatch config (classic_cv, the FixMatch setting): SGD Nesterov momentum 0.9, "
                          "lr 0.03 (no batch scaling), weight decay 5e-4, lr · cos(7πk/16K)")
    threshold: float = Field(0.95, ge=0, le=1, description="confidence cut-off: hard pseudo-label CE above it, soft "
                                                           "KL below it (USB p_cutoff)")
    temperature: float = Field(0.5, gt=0, description="sharpening of the low-confidence soft target softmax(weak / T) "
                                                      "(USB T)")


@register("refixmatch", ReFixMatchConfig)
class ReFixMatch(WeakStrongMethod):
    """ReFixMatch: confident weak predictions are hard targets of the strong view (FixMatch), the rest are its
    sharpened soft targets through a KL term, so no unlabeled image is thrown away."""

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        logits_x, logits_w, logits_s = self.forward_views(*self.views(batch))
        supervised = F.cross_entropy(logits_x.float(), batch.y)
        probs, weights = self.gated_pseudo_labels(logits_x, logits_w, batch)
        unsupervised = consistency_loss(logits_s, probs.argmax(dim=1), weights)
        low_confidence = refixmatch_low_confidence_loss(logits_s, sharpen(probs, cfg.temperature), weights)
        out = {"supervised_loss": supervised.detach(), "unsupervised_loss": unsupervised.detach(),
               "low_confidence_loss": low_confidence.detach(), "mask_rate": (weights > 0.5).float().mean()}
        return self.finish(supervised + cfg.lambda_u * (unsupervised + low_confidence), out, logits_s, weights)
