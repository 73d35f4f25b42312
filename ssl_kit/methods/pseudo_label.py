"""Pseudo-Label (Lee 2013), as USB runs it (`pseudolabel`): the model's own confident hard predictions on weakly
augmented unlabeled images are its targets, on the same view; the unlabeled weight ramps up linearly over the first
`unsup_warmup` fraction of training. Confidence gating is a swappable policy (`threshold_policy:`, pseudo_gate.py)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..data.loader import Batch
from ..losses import consistency_loss, linear_rampup
from .base import Progress
from .pseudo_gate import PseudoLabelGate
from .registry import register
from .semi import USB_SGD, SemiSupervisedConfig, SemiSupervisedMethod
from .thresholds import ThresholdConfig


class PseudoLabelConfig(SemiSupervisedConfig):
    method: Literal["pseudo_label"]

    recommended = USB_SGD
    recommended_source = ("USB's Pseudo-Label config: SGD Nesterov momentum 0.9, lr 0.03 (no batch scaling), weight decay 5e-4, lr · cos(7πk/16K)")
    mu: int = Field(1, ge=1, description="unlabeled batch = mu × labeled batch (USB uratio 1)")
    threshold: float = Field(0.95, ge=0, le=1, description="confidence for a pseudo-label (USB p_cutoff)")
    unsup_warmup: float = Field(0.4, ge=0, le=1, description="fraction of the steps over which the unlabeled weight "
                                                             "ramps linearly from 0 to lambda_u (USB unsup_warm_up)")
    threshold_policy: ThresholdConfig = Field(default_factory=ThresholdConfig)


def ramp_weight(progress: Progress, warmup_fraction: float) -> float:
    """USB's unsup_warm_up factor clip(step / (fraction · total steps), 0, 1); fraction 0 -> 1."""
    return linear_rampup(progress.step, warmup_fraction * progress.total_steps)


@register("pseudo_label", PseudoLabelConfig)
class PseudoLabel(SemiSupervisedMethod):
    """Pseudo-Label (Lee 2013): the confident hard prediction on a weak view is that view's own target, weighted
    by a linear ramp."""

    def __init__(self, cfg, backbone: nn.Module, info, num_unlabeled: int = 0) -> None:
        super().__init__(cfg, backbone, info, num_unlabeled)
        self.gate = PseudoLabelGate.from_config(cfg, info.num_classes, num_unlabeled)

    def threshold_metrics(self) -> dict:
        return self.gate.threshold_metrics()

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        n = batch.x.shape[0]
        logits = self.net(torch.cat([self.weak_view(batch.x), self.weak_view(batch.u)]))  # one pass, shared BN
        logits_x, logits_u = logits[:n], logits[n:]
        supervised = F.cross_entropy(logits_x.float(), batch.y)
        with torch.no_grad():
            self.gate.observe_labeled(torch.softmax(logits_x.detach().float(), dim=1))
            probs, weights = self.gate(torch.softmax(logits_u.detach().float(), dim=1), batch.u_index)
            self.track_pseudo_labels(probs, weights, batch.u_y)
        unsupervised = consistency_loss(logits_u, probs.argmax(dim=1), weights)
        ramp = ramp_weight(progress, cfg.unsup_warmup)
        loss = supervised + cfg.lambda_u * ramp * unsupervised
        out = {"supervised_loss": supervised.detach(), "unsupervised_loss": unsupervised.detach(),
               "mask_rate": (weights > 0.5).float().mean(), "unsup_weight": torch.tensor(cfg.lambda_u * ramp)}
        return self.with_policy_loss(self.gate, loss, out, logits_u, weights)
