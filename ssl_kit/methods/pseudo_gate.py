"""Confidence gating of pseudo-labels for every method that thresholds (FixMatch and the weak/strong family,
Pseudo-Label): optional distribution alignment, then a swappable threshold policy from thresholds.py (`threshold` +
`threshold_policy:` keys of the stage, or a method's own policy such as Dash's). One object, so each method calls it
in one line."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .thresholds import DistributionAlignment, ThresholdPolicy, build_policy


class PseudoLabelGate(nn.Module):
    """probs of the unlabeled view (N, K) -> (probs after alignment (N, K), weights (N,) in [0, 1]). `policy`: a
    ThresholdPolicy; `alignment`: a module probs (N, K) -> aligned probs (N, K) with `observe_labeled`, or None.
    State (policy, alignment) is checkpointed."""

    def __init__(self, policy: ThresholdPolicy, alignment: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.policy, self.alignment = policy, alignment

    @classmethod
    def from_config(cls, cfg, num_classes: int, num_unlabeled: int,
                    alignment: Optional[nn.Module] = None) -> "PseudoLabelGate":
        """The gate a stage config with `threshold` and `threshold_policy` (ThresholdConfig) asks for; `alignment`
        given: the method's own, else the one threshold_policy.distribution_alignment asks for (or none)."""
        options = cfg.threshold_policy
        if alignment is None and options.distribution_alignment:
            alignment = DistributionAlignment(num_classes, follow_labeled=options.alignment_target == "labeled")
        return cls(build_policy(cfg, num_classes, num_unlabeled), alignment)

    @torch.no_grad()
    def observe_labeled(self, probs: Tensor) -> None:
        """The labeled batch's class probabilities (B, K) (relative threshold, labeled alignment target)."""
        self.policy.observe_labeled(probs)
        if self.alignment is not None:
            self.alignment.observe_labeled(probs)

    @torch.no_grad()
    def align(self, probs: Tensor) -> Tensor:
        """probs (N, K) -> distribution-aligned probs (N, K) (unchanged without alignment)."""
        return probs if self.alignment is None else self.alignment(probs)

    @torch.no_grad()
    def weigh(self, probs: Tensor, index: Tensor) -> Tensor:
        """The policy's weights (N,) of pseudo-label distributions probs (N, K) at unlabeled positions index (N,);
        the policy then learns from them."""
        weights = self.policy.weights(probs, index)
        self.policy.update(probs, index)
        return weights

    @torch.no_grad()
    def forward(self, probs: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        probs = self.align(probs)
        return probs, self.weigh(probs, index)

    def extra_loss(self, logits_strong: Tensor, weights: Tensor) -> Optional[Tensor]:
        """The policy's own loss term (FreeMatch fairness), or None."""
        return self.policy.extra_loss(logits_strong.float(), weights)

    def threshold_metrics(self) -> dict:
        return {"pseudo/thresholds": [round(float(t), 4) for t in self.policy.thresholds()]}
