"""SequenceMatch (Nguyen 2024, "SequenceMatch: revisiting the design of weak-strong augmentations for
semi-supervised learning"): a medium view between the weak and the strong one, and KL consistencies along the chain
weak → medium → strong (plus weak → strong) beside the confident pseudo-label cross-entropy, so the gap each term
bridges is smaller than FixMatch's weak → strong jump. USB (semilearn `sequencematch`) is the reference."""
from __future__ import annotations

from torch import Tensor

from ._checks import check_2d, check_same
from .refixmatch import kl_consistency_loss


def sequencematch_loss(logits_medium: Tensor, logits_strong: Tensor, targets_weak: Tensor, targets_medium: Tensor,
                       weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SequenceMatch's three KL terms, each the mean over the N unlabeled rows of w_n · KL(t_n ‖ softmax(·)):
    medium ← weak: KL(t_weak ‖ softmax(medium)); strong ← medium: KL(t_medium ‖ softmax(strong)); strong ← weak:
    KL(t_weak ‖ softmax(strong)). t_weak = softmax(weak / T), t_medium = softmax(medium / T) (T: USB `T` 0.5),
    without gradient; w: the confidence mask of the weak view (USB masks every term with FlexMatch's). The caller
    adds the pseudo-label cross-entropy and weights the sum by λ_u.
    logits_medium, logits_strong, targets_weak, targets_medium: (N, K); weights: (N,).
    -> (loss_medium_weak, loss_strong_medium, loss_strong_weak), scalars."""
    check_2d("logits_medium", logits_medium)
    check_2d("logits_strong", logits_strong)
    check_same("logits_medium", logits_medium, "logits_strong", logits_strong)
    return (kl_consistency_loss(logits_medium, targets_weak, weights),
            kl_consistency_loss(logits_strong, targets_medium, weights),
            kl_consistency_loss(logits_strong, targets_weak, weights))
