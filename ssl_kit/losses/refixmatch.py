"""ReFixMatch (Nguyen & Yang 2023, "Boosting semi-supervised learning by bridging high and low-confidence
predictions"): FixMatch's confident pseudo-labels plus the low-confidence predictions FixMatch throws away, used
as soft targets: a KL consistency from the sharpened weak prediction to the strong view on the rows below the
threshold. `kl_consistency_loss` is the weighted soft-target KL that SequenceMatch uses too."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_2d


def kl_consistency_loss(logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """mean over the N rows of w_n · KL(t_n ‖ softmax(logits_n)) = w_n · Σ_k t_nk (log t_nk − log softmax(logits_n)_k)
    (0 · log 0 = 0). Targets and weights get no gradient; softmax math in fp32. logits: (N, K); targets: (N, K)
    distributions (rows summing to 1); weights: (N,). -> scalar."""
    check_2d("logits", logits)
    n, k = logits.shape
    if not hasattr(targets, "shape") or targets.shape != (n, k):
        raise ValueError(f"targets must be distributions of shape ({n}, {k}), got {tuple(getattr(targets, 'shape', ()))}")
    if not hasattr(weights, "shape") or weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {tuple(getattr(weights, 'shape', ()))}")
    targets = targets.detach().float()
    per_sample = (torch.xlogy(targets, targets) - targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
    return (per_sample * weights.detach().float()).mean()


def refixmatch_low_confidence_loss(logits_strong: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """ReFixMatch's extra term: mean over the N unlabeled rows of (1 − w_n) · KL(t_n ‖ softmax(strong_n)), with
    t = softmax(weak / T) (T: USB `T` 0.5; no gradient) and w the confidence mask (1 above the threshold), so exactly
    the rows FixMatch discards train towards their sharpened weak prediction. This is the form of the authors' code
    (KL from softmax(logits_w / T) to softmax(logits_s), weighted by 1 − mask, summed over classes, averaged over all
    rows); USB's port softmaxes the weak *probabilities* over 0.5 and divides the strong logits by 0.5 as well.
    logits_strong: (N, K); targets: (N, K); weights: (N,) in [0, 1]. -> scalar."""
    if not hasattr(weights, "shape"):
        raise ValueError(f"weights must be a tensor (N,), got {type(weights).__name__}")
    return kl_consistency_loss(logits_strong, targets, 1.0 - weights.detach().float())
