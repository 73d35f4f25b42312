"""FixMatch (Sohn et al. 2020): the weak view of an unlabeled image gives a pseudo-label (no gradient), the strong
view is trained towards it where the policy is confident. Thresholding policies live in thresholds.py; pseudo-label
quantity (mask rate) and quality (accuracy against the hidden labels) are tracked per class."""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config import StageBase, StrongAugConfig
from ..data.augment import StrongView
from ..data.loader import Batch
from ..losses import consistency_loss
from .base import ClassifierMethod, Progress
from .registry import register
from .thresholds import DistributionAlignment, ThresholdConfig, build_policy


class FixMatchConfig(StageBase):
    method: Literal["fixmatch"]
    threshold: float = Field(0.95, ge=0, le=1)
    lambda_u: float = Field(1.0, ge=0)
    mu: int = Field(7, ge=1, description="unlabeled batch = mu × labeled batch")
    temperature: float = Field(1.0, gt=0, description="sharpening of the pseudo-label softmax")
    threshold_policy: ThresholdConfig = Field(default_factory=ThresholdConfig)
    strong: StrongAugConfig = Field(default_factory=StrongAugConfig)
    joint_forward: bool = Field(True, description="labeled + both unlabeled views in one forward pass")
    eval_ema: bool = Field(True, description="evaluate the EMA model (needs train.ema_decay)")


@register("fixmatch", FixMatchConfig)
class FixMatch(ClassifierMethod):
    uses_unlabeled = True

    def unlabeled_ratio(self) -> int:
        return self.cfg.mu

    @classmethod
    def context_from(cls, cfg, data, load_record) -> dict:
        return {"num_unlabeled": len(data.unlabeled)}

    def __init__(self, cfg, backbone: nn.Module, info, num_unlabeled: int = 0) -> None:
        super().__init__(cfg, backbone, info)
        self.evaluate_ema = cfg.eval_ema
        self.strong_view = StrongView(self.normalize, cfg.strong, cfg.data.translate, cfg.data.hflip)
        self.policy = build_policy(cfg, info.num_classes, num_unlabeled)
        policy = cfg.threshold_policy
        self.alignment = DistributionAlignment(info.num_classes, follow_labeled=policy.alignment_target == "labeled") \
            if policy.distribution_alignment else None
        k = info.num_classes
        for name in ("_seen", "_masked", "_correct"):
            self.register_buffer(name, torch.zeros(k), persistent=False)
        self.register_buffer("_weight_sum", torch.zeros(()), persistent=False)

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
            self._track(probs, weights, batch.u_y)
        unsupervised = consistency_loss(logits_s, probs.argmax(dim=1), weights)
        loss = supervised + cfg.lambda_u * unsupervised
        out = {"supervised_loss": supervised.detach(), "unsupervised_loss": unsupervised.detach(),
               "mask_rate": (weights > 0.5).float().mean()}
        fairness = self.policy.extra_loss(logits_s.float(), weights)
        if fairness is not None:
            loss = loss + fairness
            out["fairness_loss"] = fairness.detach()
        out["loss"] = loss
        return out

    @torch.no_grad()
    def _track(self, probs: Tensor, weights: Tensor, hidden: Optional[Tensor]) -> None:
        """Accumulate per true class: samples seen, masked (weight > 0.5), and masked with the right pseudo-label."""
        if hidden is None:
            return
        known = hidden >= 0
        k = self.info.num_classes
        labels = hidden[known]
        masked = (weights[known] > 0.5).float()
        correct = (probs[known].argmax(1) == labels).float() * masked
        self._seen += torch.bincount(labels, minlength=k).float()
        self._masked += torch.bincount(labels, weights=masked, minlength=k)
        self._correct += torch.bincount(labels, weights=correct, minlength=k)
        self._weight_sum += weights.sum()

    def epoch_metrics(self) -> dict[str, float]:
        seen, masked, correct = self._seen.sum().item(), self._masked.sum().item(), self._correct.sum().item()
        out: dict = {}
        if seen:
            out["pseudo/mask_rate"] = masked / seen
            out["pseudo/accuracy"] = correct / masked if masked else float("nan")
            out["pseudo/mask_rate_per_class"] = (self._masked / self._seen.clamp_min(1)).tolist()
            out["pseudo/accuracy_per_class"] = [c / m if m else None for c, m in zip(self._correct.tolist(), self._masked.tolist())]
            out["pseudo/thresholds"] = [round(float(t), 4) for t in self.policy.thresholds()]
        for buffer in (self._seen, self._masked, self._correct, self._weight_sum):
            buffer.zero_()
        return out

    SWEEP_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99)

    @torch.no_grad()
    def final_report(self, model: nn.Module, data, out_dir) -> dict[str, float]:
        """Threshold sweep on the unlabeled set with the trained model: for each threshold, the fraction of images
        whose confidence passes it (quantity) and the accuracy of their pseudo-labels (quality)."""
        from ..common.metrics import predict
        from ..common.plots import plot_threshold_sweep

        images = data.train.images[data.unlabeled]
        hidden = data.train.labels[data.unlabeled].cpu()
        device = next(model.parameters()).device
        probs = torch.softmax(predict(model, images, self.normalize, device), dim=1)
        confidence, pseudo = probs.max(dim=1)
        known = hidden >= 0
        quantity, quality = [], []
        for t in self.SWEEP_THRESHOLDS:
            passed = (confidence >= t) & known
            quantity.append(float(passed.float().sum() / known.sum().clamp_min(1)))
            quality.append(float((pseudo[passed] == hidden[passed]).float().mean()) if passed.any() else float("nan"))
        plot_threshold_sweep(list(self.SWEEP_THRESHOLDS), quantity, quality,
                             out_dir / "plots" / f"threshold_sweep_{self.cfg.name}.png")
        out = {}
        for t, n, q in zip(self.SWEEP_THRESHOLDS, quantity, quality):
            out[f"sweep/quantity@{t}"] = n
            out[f"sweep/quality@{t}"] = q
        return out

