"""AdaMatch's pieces (Berthelot et al. 2022, "AdaMatch: a unified approach to semi-supervised learning and domain
adaptation"): the relative confidence threshold, random logit interpolation and distribution alignment by the
ratio of batch means. Pure functions; the stateful EMA variants live in `methods/thresholds.py`."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._checks import check_2d, check_class_vector, check_same, check_unit_interval


def relative_threshold(labeled_probs: Tensor, tau: float = 0.9) -> Tensor:
    """c_τ = τ · mean over the labeled (source) weak batch of max_k p_k: the confidence cut-off follows how sure the
    model is on labeled data (USB `AdaMatchThresholdingHook`, `p_cutoff` 0.9). No gradient.
    labeled_probs: (N, K) class probabilities. -> 0-d tensor; compare the unlabeled max probabilities with ≥."""
    check_2d("labeled_probs", labeled_probs)
    check_unit_interval("tau", tau)
    if labeled_probs.shape[0] == 0:
        raise ValueError("labeled_probs is empty: the relative threshold needs at least one labeled sample")
    with torch.no_grad():
        return tau * labeled_probs.detach().float().max(dim=1).values.mean()


def random_logit_interpolation(logits_joint: Tensor, logits_separate: Tensor,
                               generator: Optional[torch.Generator] = None) -> Tensor:
    """λ ⊙ joint + (1 − λ) ⊙ separate with λ ~ U(0, 1) drawn independently for every element (AdaMatch, §3.1):
    `logits_joint` are the labeled (source) logits of the forward pass over labeled + unlabeled images together
    (batch norm sees both domains), `logits_separate` those of a pass over the labeled images alone. Gradients flow
    into both. λ comes from `generator` if given, else torch's global RNG.
    logits_joint, logits_separate: (N, K). -> (N, K)."""
    check_2d("logits_joint", logits_joint)
    check_2d("logits_separate", logits_separate)
    check_same("logits_joint", logits_joint, "logits_separate", logits_separate)
    device = generator.device if generator is not None else logits_joint.device
    lam = torch.rand(logits_joint.shape, generator=generator, device=device).to(logits_joint.device)
    return lam * logits_joint.float() + (1.0 - lam) * logits_separate.float()


def distribution_alignment(probs: Tensor, source_mean: Tensor, target_mean: Tensor) -> Tensor:
    """AdaMatch's distribution alignment: p̃ = normalise(p ⊙ source_mean / target_mean), row-wise, so the unlabeled
    (target) predictions take the labeled (source) class distribution. source_mean, target_mean: (K,) mean class
    probabilities, in the paper of this step's source and target weak batches (an EMA of them is USB's variant);
    target_mean is clamped at 1e-12 against division by zero. Differentiable; pass detached inputs for pseudo-labels.
    probs: (N, K). -> (N, K), rows summing to 1."""
    check_2d("probs", probs)
    k = probs.shape[1]
    for name, mean in (("source_mean", source_mean), ("target_mean", target_mean)):
        check_class_vector(name, mean, k, " of probs")
    aligned = probs.float() * (source_mean.float() / target_mean.float().clamp_min(1e-12))
    return aligned / aligned.sum(dim=1, keepdim=True)
