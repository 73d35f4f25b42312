"""DebiasPL's terms (Wang et al. CVPR 2022, "Debiased learning from naturally imbalanced pseudo-labels"): the
counterfactual (logit-adjusted) pseudo-label and the adaptive marginal loss, both driven by p̂, the running mean of
the model's class probabilities on unlabeled images. Pure functions; the EMA of p̂ lives in
`methods/debiaspl.py`."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_2d, check_class_vector, check_non_negative, check_unit_interval


def _check_prior(name: str, prior: Tensor, k: int) -> None:
    check_class_vector(name, prior, k)
    if bool((prior <= 0).any()):
        raise ValueError(f"{name} must be a distribution with every entry > 0 (its log is taken), got min "
                         f"{float(prior.min())}")


def debiased_pseudo_labels(logits_weak: Tensor, prior: Tensor, tau: float = 0.4) -> Tensor:
    """Counterfactual pseudo-label p = softmax(logits_weak − τ · log p̂) (DebiasPL eq. 5; USB `debiaspl_tau` 0.4):
    the model's bias towards the classes it predicts most, p̂, is divided out. No gradient.
    logits_weak (N, K), prior p̂ (K,) positive. -> probabilities (N, K)."""
    check_2d("logits_weak", logits_weak)
    _check_prior("prior", prior, logits_weak.shape[1])
    check_non_negative("tau", tau)
    with torch.no_grad():
        return torch.softmax(logits_weak.detach().float() - tau * torch.log(prior.float()), dim=1)


def debiased_probs(probs: Tensor, prior: Tensor, tau: float = 0.4) -> Tensor:
    """`debiased_pseudo_labels` on probabilities: normalise(p ⊙ p̂^(−τ)) row-wise, equal to softmax(logits − τ log p̂)
    for p = softmax(logits) (the form a pseudo-label gate's alignment step takes). No gradient.
    probs (N, K), prior (K,) positive. -> (N, K), rows summing to 1."""
    check_2d("probs", probs)
    _check_prior("prior", prior, probs.shape[1])
    check_non_negative("tau", tau)
    with torch.no_grad():
        adjusted = probs.detach().float() * prior.float().pow(-tau)
        return adjusted / adjusted.sum(dim=1, keepdim=True)


def prior_update(prior: Tensor, probs: Tensor, momentum: float = 0.999) -> Tensor:
    """p̂ ← m · p̂ + (1 − m) · mean_n p_n: the EMA of the mean class probabilities of the unlabeled weak view (the
    DebiasPL code's `update_qhat`; USB `debiaspl_ema_p` 0.999). No gradient.
    prior (K,), probs (N, K) raw (not debiased) probabilities. -> new prior (K,)."""
    check_2d("probs", probs)
    _check_prior("prior", prior, probs.shape[1])
    check_unit_interval("momentum", momentum)
    with torch.no_grad():
        return momentum * prior.float() + (1 - momentum) * probs.detach().float().mean(dim=0)


def adaptive_marginal_loss(logits_strong: Tensor, targets: Tensor, prior: Tensor, tau: float = 0.4,
                           weights: Optional[Tensor] = None) -> Tensor:
    """DebiasPL's adaptive marginal loss: cross-entropy of (logits_strong + τ · log p̂) towards the hard
    pseudo-labels, each sample × its weight (the confidence mask), averaged over all N (FixMatch's convention).
    Adding τ log p̂ lowers the logits of the classes the model rarely predicts, so a pseudo-label of such a class
    must win by a larger margin (LDAM-like: the rare classes get the larger margins).
    logits_strong (N, K), targets (N,) int64, prior (K,) positive, weights (N,) or None. -> scalar."""
    check_2d("logits_strong", logits_strong)
    n, k = logits_strong.shape
    _check_prior("prior", prior, k)
    check_non_negative("tau", tau)
    if targets.shape != (n,) or targets.dtype != torch.long:
        raise ValueError(f"targets must be int64 of shape ({n},), got {targets.dtype} {tuple(targets.shape)}")
    adjusted = logits_strong.float() + tau * torch.log(prior.detach().float())
    per_sample = F.cross_entropy(adjusted, targets.detach(), reduction="none")
    if weights is None:
        return per_sample.mean()
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {tuple(weights.shape)}")
    return (per_sample * weights.detach().float()).mean()
