"""ABC's terms (Lee et al. NeurIPS 2021, "ABC: auxiliary balanced classifier for class-imbalanced semi-supervised
learning"): the class keep-probabilities that balance the auxiliary head's training, and its masked loss. Pure
functions (the Bernoulli draws take a generator); `methods/abc_balanced.py` wires them into FixMatch."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_2d, check_labels, check_unit_interval


def abc_keep_probs(labeled_counts: Tensor) -> Tensor:
    """Keep-probability of a labeled sample of each class, min_c n_c / n_c (K,) (USB `lb_class_dist`): the rarest
    class is always kept, a class 10× as frequent one time in 10, so the auxiliary head sees balanced classes in
    expectation. Classes without labeled images get 1 (nothing to balance; the minimum is over the others).
    labeled_counts (K,) non-negative counts. -> (K,) in (0, 1]."""
    if not hasattr(labeled_counts, "ndim") or labeled_counts.ndim != 1:
        raise ValueError(f"labeled_counts must have shape (K,), got {tuple(getattr(labeled_counts, 'shape', ()))}")
    counts = labeled_counts.float()
    if bool((counts < 0).any()) or not bool((counts > 0).any()):
        raise ValueError(f"labeled_counts must be non-negative with at least one class > 0, got {counts.tolist()}")
    present = counts > 0
    smallest = counts[present].min()
    return torch.where(present, smallest / counts.clamp_min(1e-12), torch.ones_like(counts))


def abc_unlabeled_keep_probs(keep: Tensor, progress: float) -> Tensor:
    """Keep-probability of a pseudo-labeled sample by its pseudo-class: 1 − progress · (1 − keep) (K,), i.e. no
    balancing at the start of training, the labeled one at its end (USB: progress = epoch / epochs).
    keep (K,) from `abc_keep_probs`, progress in [0, 1]. -> (K,)."""
    check_unit_interval("progress", progress)
    return 1.0 - progress * (1.0 - keep.float())


def bernoulli_mask(probs: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """A 0/1 float mask (N,) drawn with P(1) = probs (N,), from `generator` if given. No gradient."""
    with torch.no_grad():
        return torch.bernoulli(probs.detach().float(), generator=generator)


def abc_loss(logits_labeled: Tensor, labels: Tensor, logits_strong: Tensor, pseudo_labels: Tensor,
             mask_labeled: Tensor, mask_unlabeled: Tensor) -> Tensor:
    """The auxiliary head's loss: mean_B(mask_l · CE(logits_labeled, y)) + mean_N(mask_u · CE(logits_strong, ŷ)),
    each mean over the whole batch (USB's ABC). The masks are the Bernoulli balancing draws (× the confidence mask
    for the unlabeled part). logits_labeled (B, K), labels (B,), logits_strong (N, K), pseudo_labels (N,) int64,
    mask_labeled (B,), mask_unlabeled (N,). -> scalar."""
    check_2d("logits_labeled", logits_labeled)
    check_2d("logits_strong", logits_strong)
    (b, k), n = logits_labeled.shape, logits_strong.shape[0]
    check_labels("labels", labels, b, k)
    check_labels("pseudo_labels", pseudo_labels, n, logits_strong.shape[1])
    for name, mask, size in (("mask_labeled", mask_labeled, b), ("mask_unlabeled", mask_unlabeled, n)):
        if mask.shape != (size,):
            raise ValueError(f"{name} must have shape ({size},), got {tuple(mask.shape)}")
    labeled = F.cross_entropy(logits_labeled.float(), labels, reduction="none") * mask_labeled.detach().float()
    unlabeled = F.cross_entropy(logits_strong.float(), pseudo_labels.detach(), reduction="none") \
        * mask_unlabeled.detach().float()
    return labeled.mean() + unlabeled.mean()
