"""Confidence gating of pseudo-labels for the methods that threshold (Pseudo-Label, UDA), the way FixMatch does it:
optional distribution alignment, then a swappable threshold policy from thresholds.py (`threshold` +
`threshold_policy:` keys of the stage). One object, so each method calls it in one line."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .thresholds import DistributionAlignment, build_policy


class PseudoLabelGate(nn.Module):
    """probs of the unlabeled view (N, K) -> (probs after alignment (N, K), weights (N,) in [0, 1]). Needs a stage
    config with `threshold` and `threshold_policy` (ThresholdConfig). State (policy, alignment) is checkpointed."""

    def __init__(self, cfg, num_classes: int, num_unlabeled: int) -> None:
        super().__init__()
        self.policy = build_policy(cfg, num_classes, num_unlabeled)
        options = cfg.threshold_policy
        self.alignment = DistributionAlignment(num_classes, follow_labeled=options.alignment_target == "labeled") \
            if options.distribution_alignment else None

    @torch.no_grad()
    def observe_labeled(self, probs: Tensor) -> None:
        """The labeled batch's class probabilities (B, K) (relative threshold, labeled alignment target)."""
        self.policy.observe_labeled(probs)
        if self.alignment is not None:
            self.alignment.observe_labeled(probs)

    @torch.no_grad()
    def forward(self, probs: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        if self.alignment is not None:
            probs = self.alignment(probs)
        weights = self.policy.weights(probs, index)
        self.policy.update(probs, index)
        return probs, weights

    def extra_loss(self, logits_strong: Tensor, weights: Tensor) -> Optional[Tensor]:
        """The policy's own loss term (FreeMatch fairness), or None."""
        return self.policy.extra_loss(logits_strong.float(), weights)

    def threshold_metrics(self) -> dict:
        return {"pseudo/thresholds": [round(float(t), 4) for t in self.policy.thresholds()]}
