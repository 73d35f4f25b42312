"""FixMatch (Sohn et al. 2020): the weak view of an unlabeled image gives a pseudo-label (no gradient), the strong
view is trained towards it where the policy is confident. Thresholding policies live in thresholds.py; pseudo-label
quantity (mask rate) and quality (accuracy against the hidden labels) are tracked per class (semi.py)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config import StrongAugConfig
from ..data.views import StrongView
from ..data.loader import Batch
from ..losses import consistency_loss
from .base import Progress
from .registry import register
from .semi import USB_SGD, SemiSupervisedConfig, SemiSupervisedMethod
from .thresholds import DistributionAlignment, ThresholdConfig, build_policy


class FixMatchConfig(SemiSupervisedConfig):
    method: Literal["fixmatch"]

    recommended = USB_SGD
    recommended_source = ("FixMatch (Sohn et al. 2020, §4): SGD Nesterov momentum 0.9, lr 0.03 (no batch scaling), weight decay 5e-4, lr · cos(7πk/16K)")
    threshold: float = Field(0.95, ge=0, le=1)
    temperature: float = Field(1.0, gt=0, description="sharpening of the pseudo-label softmax")
    threshold_policy: ThresholdConfig = Field(default_factory=ThresholdConfig)
    strong: StrongAugConfig = Field(default_factory=StrongAugConfig)
    joint_forward: bool = Field(True, description="labeled + both unlabeled views in one forward pass")


@register("fixmatch", FixMatchConfig)
class FixMatch(SemiSupervisedMethod):
    """FixMatch: the weak view's confident prediction is the target of the strong view (swappable threshold policies:
    fixed, FlexMatch, FreeMatch, SoftMatch, relative)."""

    def __init__(self, cfg, backbone: nn.Module, info, num_unlabeled: int = 0) -> None:
        super().__init__(cfg, backbone, info, num_unlabeled)
        self.strong_view = StrongView(self.normalize, cfg.strong, cfg.data.translate, cfg.data.hflip)
        self.policy = build_policy(cfg, info.num_classes, num_unlabeled)
        policy = cfg.threshold_policy
        self.alignment = DistributionAlignment(info.num_classes, follow_labeled=policy.alignment_target == "labeled") \
            if policy.distribution_alignment else None

    def threshold_metrics(self) -> dict:
        return {"pseudo/thresholds": [round(float(t), 4) for t in self.policy.thresholds()]}

    def _logits(self, x: Tensor, u_weak: Tensor, u_strong: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.cfg.joint_forward:  # one pass: BN sees labeled and unlabeled images together, as in the reference
            logits = self.net(torch.cat([x, u_weak, u_strong]))
            return logits[:x.shape[0]], *logits[x.shape[0]:].chunk(2)
        return self.net(x), self.net(u_weak), self.net(u_strong)

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        logits_x, logits_w, logits_s = self._logits(self.weak_view(batch.x), self.weak_view(batch.u),
                                                    self.strong_view(batch.u))
        supervised = F.cross_entropy(logits_x.float(), batch.y)
        with torch.no_grad():
            labeled_probs = torch.softmax(logits_x.detach().float() / cfg.temperature, dim=1)
            self.policy.observe_labeled(labeled_probs)
            if self.alignment is not None:
                self.alignment.observe_labeled(labeled_probs)
            probs = torch.softmax(logits_w.detach().float() / cfg.temperature, dim=1)
            if self.alignment is not None:
                probs = self.alignment(probs)
            weights = self.policy.weights(probs, batch.u_index)
            self.policy.update(probs, batch.u_index)
            self.track_pseudo_labels(probs, weights, batch.u_y)
        unsupervised = consistency_loss(logits_s, probs.argmax(dim=1), weights)
        loss = supervised + cfg.lambda_u * unsupervised
        out = {"supervised_loss": supervised.detach(), "unsupervised_loss": unsupervised.detach(),
               "mask_rate": (weights > 0.5).float().mean()}
        return self.with_policy_loss(self.policy, loss, out, logits_s, weights)
