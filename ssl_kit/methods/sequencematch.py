"""SequenceMatch (Nguyen 2024, "SequenceMatch: revisiting the design of weak-strong augmentations for
semi-supervised learning"), as USB runs it (`sequencematch`): a medium view (RandAugment with one op + Cutout, USB's
`transform_medium`) between the weak and the strong one; beside FixMatch's confident hard pseudo-label CE on the
strong view, three KL consistencies along the chain (`sequencematch_loss`): weak → medium, medium → strong and
weak → strong, each towards the sharpened softmax(· / T) of the less augmented view and masked by the weak view's
confidence gate (FlexMatch's class-wise thresholds with warm-up by default, as USB):
L = CE(labeled) + λ_u (L_ce + L_mw + L_sm + L_sw).

The targets are softmax(logits / T) of the weak and medium views (the weak one after the gate's optional alignment);
USB's port softmaxes their *probabilities* over T instead. One joint pass over cat([labeled, unlabeled weak, medium,
strong]) (USB's order)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config import StrongAugConfig
from ..data.loader import Batch
from ..data.views import StrongView
from ..losses import consistency_loss, sequencematch_loss, sharpen
from .base import Progress
from .registry import register
from .semi import USB_SGD
from .thresholds import ThresholdConfig
from .weak_strong import GatedConfig, WeakStrongMethod


class SequenceMatchConfig(GatedConfig):
    """SequenceMatch keys; defaults from USB's `sequencematch` (algorithm arguments and all its configs): p_cutoff
    0.95, T 0.5, ulb_loss_ratio 1.0, hard_label True, FlexMatch thresholds with thresh_warmup True, uratio 7 (CIFAR),
    medium view RandAugment(1 op) + Cutout (USB's dataset `transform_medium`)."""

    method: Literal["sequencematch"]

    recommended = USB_SGD
    recommended_source = ("USB's SequenceMatch config (classic_cv, the FixMatch setting): SGD Nesterov momentum 0.9, "
                          "lr 0.03 (no batch scaling), weight decay 5e-4, lr · cos(7πk/16K)")
    threshold: float = Field(0.95, ge=0, le=1, description="confidence cut-off τ of the FlexMatch class thresholds "
                                                           "(USB p_cutoff)")
    temperature: float = Field(0.5, gt=0, description="sharpening of the KL targets softmax(weak / T), "
                                                      "softmax(medium / T) (USB T)")
    threshold_policy: ThresholdConfig = Field(
        default_factory=lambda: ThresholdConfig(policy="flexmatch", flexmatch_warmup=True),
        description="USB's SequenceMatch masks with FlexMatch's thresholds (thresh_warmup True)")
    medium: StrongAugConfig = Field(
        default_factory=lambda: StrongAugConfig(num_ops=1),
        description="the medium view: weak + RandAugment with num_ops ops + Cutout (USB transform_medium: "
                    "RandAugment(1, 5), random magnitudes, Cutout up to 0.5)")


@register("sequencematch", SequenceMatchConfig)
class SequenceMatch(WeakStrongMethod):
    """SequenceMatch: weak, medium and strong views; confident hard pseudo-labels train the strong view and KL terms
    tie weak → medium → strong (and weak → strong) where the gate is confident."""

    def __init__(self, cfg, backbone: nn.Module, info, num_unlabeled: int = 0) -> None:
        super().__init__(cfg, backbone, info, num_unlabeled)
        self.medium_view = StrongView(self.normalize, cfg.medium, cfg.data.translate, cfg.data.hflip)

    def forward_all(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Views (weak labeled, weak, strong, then medium unlabeled) through the classifier -> logits (labeled (B, K),
        weak (N, K), medium (N, K), strong (N, K)); one pass over cat([labeled, weak, medium, strong]) with
        joint_forward."""
        x, u_weak, u_strong = self.views(batch)
        u_medium = self.medium_view(batch.u)
        first, logits_m, logits_s = self.forward_views(torch.cat([x, u_weak]), u_medium, u_strong)
        return first[:x.shape[0]], first[x.shape[0]:], logits_m, logits_s

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        logits_x, logits_w, logits_m, logits_s = self.forward_all(batch)
        supervised = F.cross_entropy(logits_x.float(), batch.y)
        probs, weights = self.gated_pseudo_labels(logits_x, logits_w, batch)
        unsupervised = consistency_loss(logits_s, probs.argmax(dim=1), weights)
        targets_medium = torch.softmax(logits_m.detach().float() / cfg.temperature, dim=1)
        medium_weak, strong_medium, strong_weak = sequencematch_loss(
            logits_m, logits_s, sharpen(probs, cfg.temperature), targets_medium, weights)
        out = {"supervised_loss": supervised.detach(), "unsupervised_loss": unsupervised.detach(),
               "kl_medium_weak": medium_weak.detach(), "kl_strong_medium": strong_medium.detach(),
               "kl_strong_weak": strong_weak.detach(), "mask_rate": (weights > 0.5).float().mean()}
        total = supervised + cfg.lambda_u * (unsupervised + medium_weak + strong_medium + strong_weak)
        return self.finish(total, out, logits_s, weights)
