"""What the semi-supervised methods share (FixMatch and its successors, Pseudo-Label, Mean Teacher, UDA, MixMatch,
SimMatch, AdaMatch, Dash): a labeled stream plus μ× unlabeled images per step, a classifier evaluated as its EMA
copy, and the pseudo-label bookkeeping every method of this family logs — per-class quantity (mask rate) and quality
(accuracy against the hidden labels) per epoch, and a threshold sweep of the trained model at the end."""
from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field
from torch import Tensor, nn

from ..common.metrics import predict
from ..common.plots import plot_threshold_sweep
from ..config import StageBase
from ..data.fileset import image_batches
from ..data.needs import DataNeeds
from .base import ClassifierMethod


# USB's training setting for every algorithm of this family (FixMatch §4: SGD Nesterov 0.9, lr 0.03, weight decay
# 5e-4, lr · cos(7πk/16K), batch 64 labeled + μ·64 unlabeled, no batch scaling): each method's `recommended`.
USB_SGD = {"optimizer": {"name": "sgd", "lr": 0.03, "lr_scaling": "none", "weight_decay": 5e-4, "momentum": 0.9,
                         "nesterov": True},
           "schedule": {"name": "fixmatch_cosine", "warmup_epochs": 0}}


def usb_imbalanced_mu():
    """The `mu` field of the methods for imbalanced data (one definition for all): USB's classic_cv_imb configs use
    uratio 2."""
    return Field(2, ge=1, description="unlabeled batch = mu × labeled batch (USB classic_cv_imb uratio 2)")


class SemiSupervisedConfig(StageBase):
    """Keys of every method that trains on labeled + unlabeled batches."""

    lambda_u: float = Field(1.0, ge=0, description="weight of the unlabeled loss")
    mu: int = Field(7, ge=1, description="unlabeled batch = mu × labeled batch")
    eval_ema: bool = Field(True, description="evaluate the EMA model (needs train.ema_decay)")

    def unlabeled_ratio(self) -> int:
        return self.mu


class SemiSupervisedMethod(ClassifierMethod):
    """ClassifierMethod (`self.net`) fed labeled `batch.x, batch.y` and unlabeled `batch.u` (hidden labels `batch.u_y`
    for diagnostics only, positions `batch.u_index` for per-sample state). Subclasses call `track_pseudo_labels`
    in training_step; `threshold_metrics` adds a thresholding policy's state to the epoch log."""

    @classmethod
    def data_needs(cls, cfg) -> DataNeeds:
        """Labeled batches + μ× unlabeled images from the pool (cfg.mu)."""
        return DataNeeds(unlabeled=True, unlabeled_ratio=cfg.unlabeled_ratio())

    @classmethod
    def context_from(cls, cfg, data, load_record) -> dict:
        return {"num_unlabeled": len(data.unlabeled)}

    def __init__(self, cfg, backbone: nn.Module, info, num_unlabeled: int = 0) -> None:
        super().__init__(cfg, backbone, info)
        self.evaluate_ema = cfg.eval_ema
        self.num_unlabeled = num_unlabeled
        k = info.num_classes
        for name in ("_seen", "_masked", "_correct"):
            self.register_buffer(name, torch.zeros(k), persistent=False)
        self.register_buffer("_weight_sum", torch.zeros(()), persistent=False)

    @staticmethod
    def with_policy_loss(policy, loss: Tensor, out: dict, logits_strong: Tensor, weights: Tensor) -> dict:
        """Finish a step's outputs: add the threshold policy's own loss term when it has one (FreeMatch's fairness,
        logged as fairness_loss) to `loss`, and put the total under out["loss"]. policy: a ThresholdPolicy or a
        PseudoLabelGate (anything with `extra_loss(logits_strong (N, K), weights (N,))`). -> out."""
        extra = policy.extra_loss(logits_strong.float(), weights)
        if extra is not None:
            loss = loss + extra
            out["fairness_loss"] = extra.detach()
        out["loss"] = loss
        return out

    def threshold_metrics(self) -> dict:
        """The thresholding policy's state for the epoch log (methods with a policy return its thresholds)."""
        return {}

    @torch.no_grad()
    def track_pseudo_labels(self, probs: Tensor, weights: Tensor, hidden: Optional[Tensor]) -> None:
        """Accumulate per true class: samples seen, masked (weight > 0.5), and masked with the right pseudo-label.
        probs (N, K) pseudo-label distributions of the unlabeled batch, weights (N,), hidden (N,) true labels (−1
        unknown; None: nothing to track). Logged per epoch as pseudo/mask_rate, pseudo/accuracy (+ per class)."""
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
            out.update(self.threshold_metrics())
        for buffer in (self._seen, self._masked, self._correct, self._weight_sum):
            buffer.zero_()
        return out

    SWEEP_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99)
    SWEEP_LIMIT = 50_000  # streamed: unlabeled images scored by the sweep (bounded work on large sets)

    @torch.no_grad()
    def final_report(self, model: nn.Module, data, out_dir) -> dict[str, float]:
        """Threshold sweep on the unlabeled set (streamed: SWEEP_LIMIT images spread over it, decoded with the
        evaluation transform) with the trained model: for each threshold, the fraction of images whose confidence
        passes it (quantity) and the accuracy of their pseudo-labels (quality)."""
        rows = data.spread_rows(data.unlabeled, self.SWEEP_LIMIT)
        pool = data.train.subset(rows)
        device = next(model.parameters()).device
        info, outputs, hidden = self.info, [], []
        for images, labels in image_batches(pool, info.image_size, info.channels, 512, self.cfg.data.workers,
                                            self.cfg.data.eval_resize_ratio):
            outputs.append(torch.softmax(predict(model, images, self.normalize, device), dim=1))
            hidden.append(labels.cpu())
        if not outputs:
            return {}
        probs, hidden = torch.cat(outputs), torch.cat(hidden)
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

