"""Pseudo-label thresholding policies, swappable objects (nn.Modules so their state is checkpointed):

fixed (FixMatch), FlexMatch (class-wise curriculum), FreeMatch (self-adaptive thresholds + fairness),
SoftMatch (Gaussian soft weights), relative (AdaMatch). Distribution alignment is a separate, optional step before
any of them.

Each policy maps probabilities of the weak view (N, K) to per-sample weights (N,) in [0, 1] and then updates its
state from the same batch."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field
from torch import Tensor, nn

from ..common import distributed as dist
from ..config import Strict


class ThresholdConfig(Strict):
    """Which policy turns weak-view confidences into per-sample weights, and its knobs (`threshold_policy:` in a
    FixMatch-family stage)."""

    policy: Literal["fixed", "flexmatch", "freematch", "softmatch", "relative"] = Field(
        "fixed", description="relative (AdaMatch): threshold × mean confidence on the labeled batch's weak view")
    flexmatch_warmup: bool = True
    ema: float = Field(0.999, gt=0, lt=1, description="freematch/softmatch EMA momentum")
    freematch_fairness_weight: float = Field(0.0, ge=0)
    distribution_alignment: bool = False
    alignment_target: Literal["uniform", "labeled"] = Field(
        "uniform", description="align pseudo-labels to a uniform class distribution or to the model's running mean "
                               "prediction on labeled images (AdaMatch, for domain shift)")


class ThresholdPolicy(nn.Module):
    def weights(self, probs: Tensor, index: Tensor) -> Tensor:
        """probs (N, K), index (N,) positions in the unlabeled set -> weights (N,) in [0, 1]."""
        raise NotImplementedError

    def update(self, probs: Tensor, index: Tensor) -> None:
        """Learn from this batch's weak-view probabilities (called after `weights`)."""

    def observe_labeled(self, probs: Tensor) -> None:
        """See the labeled batch's probabilities (N, K) (called before `weights`)."""

    def extra_loss(self, logits_strong: Tensor, weights: Tensor) -> Optional[Tensor]:
        return None

    def thresholds(self) -> Tensor:
        """Current per-class thresholds (K,) for logging."""
        raise NotImplementedError


class FixedThreshold(ThresholdPolicy):
    """FixMatch: weight 1 where max prob ≥ τ, else 0."""

    def __init__(self, threshold: float, num_classes: int) -> None:
        super().__init__()
        self.threshold, self.num_classes = threshold, num_classes

    def weights(self, probs: Tensor, index: Tensor) -> Tensor:
        return (probs.max(dim=1).values >= self.threshold).float()

    def thresholds(self) -> Tensor:
        return torch.full((self.num_classes,), self.threshold)


class FlexMatchThreshold(ThresholdPolicy):
    """FlexMatch: each unlabeled sample's last confident prediction is its learning status; class c's learning effect
    σ(c) = #samples whose status is c, normalised β(c) = σ(c) / max(max σ, #unused) (warmup) or / max σ;
    threshold T(c) = τ · β(c) / (2 − β(c)) (the convex mapping)."""

    def __init__(self, threshold: float, num_classes: int, num_unlabeled: int, warmup: bool = True) -> None:
        super().__init__()
        self.threshold, self.num_classes, self.warmup = threshold, num_classes, warmup
        self.register_buffer("status", torch.full((num_unlabeled,), -1, dtype=torch.long))

    def _class_thresholds(self) -> Tensor:
        counts = torch.bincount(self.status + 1, minlength=self.num_classes + 1).float()
        unused, learned = counts[0], counts[1:]
        denominator = torch.maximum(learned.max(), unused) if self.warmup else learned.max()
        beta = learned / denominator.clamp_min(1.0)
        return self.threshold * beta / (2.0 - beta)

    def weights(self, probs: Tensor, index: Tensor) -> Tensor:
        confidence, pseudo = probs.max(dim=1)
        return (confidence >= self._class_thresholds()[pseudo]).float()

    @torch.no_grad()
    def update(self, probs: Tensor, index: Tensor) -> None:
        confidence, pseudo = probs.max(dim=1)
        index, confidence, pseudo = dist.gather_no_grad(index), dist.gather_no_grad(confidence), dist.gather_no_grad(pseudo)
        confident = confidence > self.threshold
        self.status[index[confident]] = pseudo[confident]

    def thresholds(self) -> Tensor:
        return self._class_thresholds()


class FreeMatchThreshold(ThresholdPolicy):
    """FreeMatch: global τ_t = EMA of the mean max probability, local p̃_t = EMA of the mean probability vector;
    class threshold τ_t(c) = p̃_t(c) / max p̃_t · τ_t. Optional self-adaptive fairness term on the strong view."""

    def __init__(self, num_classes: int, ema: float = 0.999, fairness_weight: float = 0.0) -> None:
        super().__init__()
        self.num_classes, self.ema, self.fairness_weight = num_classes, ema, fairness_weight
        self.register_buffer("global_threshold", torch.tensor(1.0 / num_classes))
        self.register_buffer("class_probs", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("label_hist", torch.full((num_classes,), 1.0 / num_classes))

    def thresholds(self) -> Tensor:
        return self.class_probs / self.class_probs.max() * self.global_threshold

    def weights(self, probs: Tensor, index: Tensor) -> Tensor:
        confidence, pseudo = probs.max(dim=1)
        return (confidence >= self.thresholds()[pseudo]).float()

    @torch.no_grad()
    def update(self, probs: Tensor, index: Tensor) -> None:
        probs = dist.gather_no_grad(probs.float())
        confidence, pseudo = probs.max(dim=1)
        m = self.ema
        self.global_threshold.mul_(m).add_((1 - m) * confidence.mean())
        self.class_probs.mul_(m).add_((1 - m) * probs.mean(dim=0))
        hist = torch.bincount(pseudo, minlength=self.num_classes).float()
        self.label_hist.mul_(m).add_((1 - m) * hist / hist.sum())

    def extra_loss(self, logits_strong: Tensor, weights: Tensor) -> Optional[Tensor]:
        """Fairness: Σ_c p̄_model(c) · log p̄_strong(c), each class distribution divided by its label histogram and
        renormalised (as in the FreeMatch reference code); computed over the masked samples only."""
        if self.fairness_weight == 0 or not bool((weights > 0).any()):
            return None
        probs_s = torch.softmax(logits_strong[weights > 0].float(), dim=1)
        hist_s = torch.bincount(probs_s.argmax(1), minlength=self.num_classes).float()
        hist_s = hist_s / hist_s.sum()
        model = self.class_probs / self.label_hist.clamp_min(1e-12)
        model = model / model.sum()
        inv_hist_s = torch.where(hist_s > 0, 1.0 / hist_s.clamp_min(1e-12), torch.zeros_like(hist_s))
        mean_s = probs_s.mean(dim=0) * inv_hist_s
        mean_s = mean_s / mean_s.sum().clamp_min(1e-12)
        return self.fairness_weight * (model * torch.log(mean_s + 1e-12)).sum()


class SoftMatchWeights(ThresholdPolicy):
    """SoftMatch: weight 1 where max prob ≥ μ_t, else exp(−(p − μ_t)² / (2σ_t²)), with μ_t, σ_t² EMAs of the mean
    and (unbiased) variance of the batch's max probabilities."""

    def __init__(self, num_classes: int, ema: float = 0.999) -> None:
        super().__init__()
        self.num_classes, self.ema = num_classes, ema
        self.register_buffer("mean", torch.tensor(1.0 / num_classes))
        self.register_buffer("var", torch.tensor(1.0))

    def weights(self, probs: Tensor, index: Tensor) -> Tensor:
        confidence = probs.max(dim=1).values
        gaussian = torch.exp(-((confidence - self.mean) ** 2) / (2 * self.var.clamp_min(1e-12)))
        return torch.where(confidence >= self.mean, torch.ones_like(confidence), gaussian)

    @torch.no_grad()
    def update(self, probs: Tensor, index: Tensor) -> None:
        confidence = dist.gather_no_grad(probs.float()).max(dim=1).values
        m = self.ema
        self.mean.mul_(m).add_((1 - m) * confidence.mean())
        batch_var = confidence.var(unbiased=True) if confidence.numel() > 1 else torch.zeros_like(self.var)
        self.var.mul_(m).add_((1 - m) * batch_var)

    def thresholds(self) -> Tensor:
        return self.mean.expand(self.num_classes).clone()


class RelativeThreshold(ThresholdPolicy):
    """AdaMatch (Berthelot et al. 2022): weight 1 where max prob ≥ τ · mean max prob of the labeled batch's weak
    view. Under domain shift the model is less sure on the target; the cut-off follows its confidence on the
    source instead of a fixed number."""

    def __init__(self, threshold: float, num_classes: int) -> None:
        super().__init__()
        self.threshold, self.num_classes = threshold, num_classes
        self.register_buffer("labeled_confidence", torch.tensor(1.0))

    def observe_labeled(self, probs: Tensor) -> None:
        self.labeled_confidence.copy_(dist.gather_no_grad(probs.float().max(dim=1).values).mean())

    def weights(self, probs: Tensor, index: Tensor) -> Tensor:
        return (probs.max(dim=1).values >= self.threshold * self.labeled_confidence).float()

    def thresholds(self) -> Tensor:
        return torch.full((self.num_classes,), float(self.threshold * self.labeled_confidence))


class DistributionAlignment(nn.Module):
    """p ← normalise(p · p_target / p_model), p_model = EMA (0.999) of the mean unlabeled prediction; p_target is
    uniform, or (AdaMatch, `follow_labeled`) the EMA of the mean prediction on labeled images."""

    def __init__(self, num_classes: int, momentum: float = 0.999, follow_labeled: bool = False) -> None:
        super().__init__()
        self.momentum, self.follow_labeled = momentum, follow_labeled
        self.register_buffer("p_model", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("p_target", torch.full((num_classes,), 1.0 / num_classes))

    @torch.no_grad()
    def observe_labeled(self, probs: Tensor) -> None:
        if self.follow_labeled:
            mean = dist.gather_no_grad(probs.float()).mean(dim=0)
            self.p_target.mul_(self.momentum).add_((1 - self.momentum) * mean)

    def forward(self, probs: Tensor) -> Tensor:
        with torch.no_grad():
            mean = dist.gather_no_grad(probs.float()).mean(dim=0)
            self.p_model.mul_(self.momentum).add_((1 - self.momentum) * mean)
        aligned = probs * (self.p_target / self.p_model.clamp_min(1e-12))
        return aligned / aligned.sum(dim=1, keepdim=True)


def build_policy(cfg, num_classes: int, num_unlabeled: int) -> ThresholdPolicy:
    """From a FixMatch stage config (threshold, threshold_policy) to a policy object."""
    policy = cfg.threshold_policy
    if policy.policy == "fixed":
        return FixedThreshold(cfg.threshold, num_classes)
    if policy.policy == "flexmatch":
        return FlexMatchThreshold(cfg.threshold, num_classes, num_unlabeled, policy.flexmatch_warmup)
    if policy.policy == "freematch":
        return FreeMatchThreshold(num_classes, policy.ema, policy.freematch_fairness_weight)
    if policy.policy == "relative":
        return RelativeThreshold(cfg.threshold, num_classes)
    return SoftMatchWeights(num_classes, policy.ema)
