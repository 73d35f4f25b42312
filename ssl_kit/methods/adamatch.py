"""AdaMatch (Berthelot et al. 2022, "AdaMatch: a unified approach to semi-supervised learning and domain
adaptation"), complete: FixMatch's weak/strong consistency plus the pieces the paper adds —

- the labeled (source) batch is augmented weakly and strongly, and the supervised loss is the paper's Algorithm 1
  source loss, CE(y, z_weak) + CE(y, z_strong), each cross-entropy averaged over the batch (`labeled_strong`;
  false: CE(y, z_weak) alone, as USB's AdaMatch);
- random logit interpolation: the labeled logits (of both labeled views) are λ ⊙ (labeled+unlabeled pass) +
  (1 − λ) ⊙ (labeled-only pass) with λ ~ U(0, 1) per element, so batch norm sees both domains without the labeled
  loss depending on which;
- distribution alignment: the unlabeled weak predictions are rescaled by (labeled mean / unlabeled mean) class
  probabilities (labeled: the weak view's; an EMA of both, USB's `ema_p`; `ema_p: 0` uses this batch's means, as
  the paper does);
- the relative threshold: τ × the mean confidence on the labeled batch's weak view (a swappable policy of
  thresholds.py, `threshold_policy.policy: relative` by default);

and the paper's cosine warm-up of the unlabeled weight (½ − ½cos, reaching λ_u half-way through training)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from ..data.loader import Batch
from ..losses import consistency_loss, cosine_rampup, random_logit_interpolation
from .base import Progress
from .pseudo_gate import PseudoLabelGate
from .registry import register
from .semi import USB_SGD
from .thresholds import DistributionAlignment, ThresholdConfig
from .weak_strong import GatedConfig, WeakStrongMethod, split_joint


class AdaMatchConfig(GatedConfig):
    method: Literal["adamatch"]

    recommended = USB_SGD
    recommended_source = ("USB's AdaMatch config: SGD Nesterov momentum 0.9, lr 0.03 (no batch scaling), weight decay 5e-4, lr · cos(7πk/16K)")
    threshold: float = Field(0.9, ge=0, le=1, description="τ: the cut-off is τ × mean max prob on the labeled batch "
                                                          "(USB p_cutoff; the paper's τ 0.9)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the pseudo-labels (USB T)")
    labeled_strong: bool = Field(True, description="also train on a strong view of the labeled batch: supervised "
                                                   "loss CE(weak) + CE(strong), the paper's Algorithm 1; false: "
                                                   "CE(weak) only (USB's AdaMatch)")
    hard_label: bool = Field(True, description="arg-max pseudo-labels (USB hard_label); false: soft targets")
    dist_align: bool = Field(True, description="align unlabeled predictions to the labeled class distribution "
                                               "(USB dist_align)")
    ema_p: float = Field(0.999, ge=0, lt=1, description="EMA momentum of the alignment's class means (USB ema_p); "
                                                        "0: this batch's means (the paper)")
    logit_interpolation: bool = Field(True, description="random logit interpolation of the labeled logits (needs "
                                                        "one more forward pass over the labeled images)")
    unsup_warmup: float = Field(0.5, ge=0, le=1, description="fraction of training over which λ_u ramps up as "
                                                             "½ − ½cos (the paper: 0.5); 0 = constant")
    threshold_policy: ThresholdConfig = Field(default_factory=lambda: ThresholdConfig(policy="relative"))

    @model_validator(mode="after")
    def _alignment_is_adamatchs(self) -> "AdaMatchConfig":
        if self.threshold_policy.distribution_alignment:
            raise ValueError("threshold_policy.distribution_alignment: AdaMatch aligns distributions itself "
                             "(dist_align, ema_p); leave it false")
        if not self.joint_forward:
            raise ValueError("joint_forward: AdaMatch's random logit interpolation mixes the labeled logits of the "
                             "joint pass with a labeled-only pass; it needs joint_forward: true")
        return self


@register("adamatch", AdaMatchConfig)
class AdaMatch(WeakStrongMethod):
    """AdaMatch: FixMatch whose labeled batch is seen weakly and strongly (source loss CE(weak) + CE(strong)), with
    random logit interpolation of the labeled logits, distribution alignment to the labeled weak predictions and a
    threshold relative to the labeled weak confidence."""

    def build_gate(self, cfg, num_classes: int, num_unlabeled: int) -> PseudoLabelGate:
        alignment = DistributionAlignment(num_classes, momentum=cfg.ema_p, follow_labeled=True) \
            if cfg.dist_align else None
        return PseudoLabelGate.from_config(cfg, num_classes, num_unlabeled, alignment)

    def labeled_views(self, images: Tensor) -> Tensor:
        """uint8 labeled images (N, C, H, W) -> their views stacked (V·N, C, H, W): weak, then strong when
        labeled_strong (V = 2), else weak only (V = 1)."""
        views = [self.weak_view(images)]
        if self.cfg.labeled_strong:
            views.append(self.strong_view(images))
        return torch.cat(views)

    def labeled_logits(self, x: Tensor, logits_joint: Tensor) -> Tensor:
        """The labeled logits (V·N, K) of the labeled views x (V·N, C, H, W) that the supervised loss and the relative
        threshold use: with logit interpolation, λ ⊙ joint + (1 − λ) ⊙ (a pass over the labeled views alone),
        λ ~ U(0, 1) per element; else the joint ones."""
        if not self.cfg.logit_interpolation:
            return logits_joint.float()
        return random_logit_interpolation(logits_joint, self.net(x))

    @staticmethod
    def source_loss(logits_x: Tensor, labels: Tensor) -> Tensor:
        """Σ over the labeled views of the batch-mean cross-entropy: logits_x (V·N, K) view-major, labels (N,)
        -> scalar (CE(weak) + CE(strong) for V = 2)."""
        return sum(F.cross_entropy(view, labels) for view in logits_x.split(labels.shape[0]))

    def unsup_weight(self, progress: Progress) -> float:
        """λ_u × ½ − ½cos(π · min(step / (unsup_warmup · total), 1))."""
        return self.cfg.lambda_u * cosine_rampup(progress.step, self.cfg.unsup_warmup * progress.total_steps)

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        x, u_weak, u_strong = self.labeled_views(batch.x), self.weak_view(batch.u), self.strong_view(batch.u)
        logits_joint, logits_w, logits_s = split_joint(self.net(torch.cat([x, u_weak, u_strong])), x.shape[0])
        logits_x = self.labeled_logits(x, logits_joint)
        supervised = self.source_loss(logits_x, batch.y)
        # threshold and alignment follow the labeled weak view (the first N rows)
        probs, weights = self.gated_pseudo_labels(logits_x[:batch.y.shape[0]], logits_w, batch, cfg.temperature)
        unsupervised = consistency_loss(logits_s, probs.argmax(dim=1) if cfg.hard_label else probs, weights)
        weight_u = self.unsup_weight(progress)
        out = {"supervised_loss": supervised.detach(), "unsupervised_loss": unsupervised.detach(),
               "mask_rate": (weights > 0.5).float().mean(), "unsup_weight": torch.tensor(weight_u)}
        return self.finish(supervised + weight_u * unsupervised, out, logits_s, weights)
