"""UDA (Xie et al. 2020), as USB runs it (`uda`): the strong view of an unlabeled image is trained towards the
sharpened prediction softmax(weak / T) of its weak view where the model is confident (cross-entropy form of the KL,
`uda_loss`); optional training-signal annealing (TSA) drops labeled samples the model already predicts with more
than η_t confidence. Confidence gating is a swappable policy (`threshold_policy:`, pseudo_gate.py); with the fixed
policy the unlabeled term is exactly `uda_loss(weak, strong, threshold, temperature)`."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..data.loader import Batch
from ..losses import consistency_loss, sharpen, tsa_mask, tsa_threshold
from .base import Progress
from .registry import register
from .semi import USB_SGD
from .weak_strong import GatedConfig, WeakStrongMethod


class UDAConfig(GatedConfig):
    method: Literal["uda"]

    recommended = USB_SGD
    recommended_source = ("USB's UDA config: SGD Nesterov momentum 0.9, lr 0.03 (no batch scaling), weight decay 5e-4, lr · cos(7πk/16K)")
    threshold: float = Field(0.8, ge=0, le=1, description="confidence mask on the weak prediction (USB p_cutoff)")
    temperature: float = Field(0.4, gt=0, description="sharpening of the weak-view target (USB T)")
    tsa_schedule: Literal["none", "linear", "exp", "log"] = Field(
        "none", description="training-signal annealing of the labeled loss (USB tsa_schedule)")


@register("uda", UDAConfig)
class UDA(WeakStrongMethod):
    """UDA: the sharpened weak-view prediction is the strong view's soft target where confident; optional
    training-signal annealing of the labeled loss."""

    def supervised_loss(self, logits_x: Tensor, y: Tensor, progress: Progress) -> tuple[Tensor, float, Tensor]:
        """CE of the labeled batch with TSA: samples whose correct-class probability exceeds η_t count as zeros
        (mean over all B, USB's reduction). -> (loss, η_t, kept mask (B,))."""
        eta = tsa_threshold(self.cfg.tsa_schedule, progress.fraction, self.info.num_classes)
        kept = tsa_mask(logits_x, y, eta)
        return (F.cross_entropy(logits_x.float(), y, reduction="none") * kept).mean(), eta, kept

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        logits_x, logits_w, logits_s = self.forward_views(*self.views(batch))
        supervised, eta, kept = self.supervised_loss(logits_x, batch.y, progress)
        probs, weights = self.gated_pseudo_labels(logits_x, logits_w, batch)
        target = sharpen(probs, cfg.temperature)  # = softmax(weak / T) without alignment
        unsupervised = consistency_loss(logits_s, target, weights)
        out = {"supervised_loss": supervised.detach(), "unsupervised_loss": unsupervised.detach(),
               "mask_rate": (weights > 0.5).float().mean(), "tsa/threshold": torch.tensor(eta),
               "tsa/kept": kept.mean()}
        return self.finish(supervised + cfg.lambda_u * unsupervised, out, logits_s, weights)
