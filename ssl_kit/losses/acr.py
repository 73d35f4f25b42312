"""ACR's terms (Wei & Gan CVPR 2023, "Towards realistic long-tailed semi-supervised learning: consistency is all you
need"): logit adjustment by a class prior, the logit-adjusted (balanced) cross-entropy of the balanced branch, the
symmetric KL distance of the estimated unlabeled class distribution to the three anchors (consistent, uniform,
reversed), and the adjustment intensity τ it sets. Pure functions; the running estimates live in `methods/acr.py`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_2d, check_class_vector, check_labels, check_non_negative

EPS = 1e-12


def _check_distribution(name: str, p: Tensor, k: int | None = None) -> None:
    if not hasattr(p, "ndim") or p.ndim != 1 or (k is not None and p.shape[0] != k):
        want = f"({k},)" if k is not None else "(K,)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(getattr(p, 'shape', ()))}")
    if bool((p < 0).any()):
        raise ValueError(f"{name} must be non-negative (a class distribution), got min {float(p.min())}")


def logit_adjustment(prior: Tensor, tau: float) -> Tensor:
    """log(π^τ + 1e-12) (K,): the offset of logit adjustment (Menon et al. 2021) with intensity τ, as ACR's code
    computes it (the 1e-12 keeps classes without labeled images finite). prior (K,) -> (K,). No gradient."""
    _check_distribution("prior", prior)
    check_non_negative("tau", tau)
    return torch.log(prior.detach().float() ** tau + EPS)


def logit_adjusted_loss(logits: Tensor, labels: Tensor, adjustment: Tensor) -> Tensor:
    """The balanced branch's labeled loss: mean cross-entropy of (logits + adjustment) towards labels (logit-adjusted
    loss; adjustment = `logit_adjustment(π_labeled, τ2)`). logits (N, K), labels (N,), adjustment (K,) -> scalar."""
    check_2d("logits", logits)
    n, k = logits.shape
    check_labels("labels", labels, n, k)
    check_class_vector("adjustment", adjustment, k)
    return F.cross_entropy(logits.float() + adjustment.detach().float(), labels)


def adjusted_pseudo_labels(logits_weak: Tensor, adjustment: Tensor) -> Tensor:
    """softmax(logits_weak − adjustment): the pseudo-label with the labeled prior's bias taken out. No gradient.
    logits_weak (N, K), adjustment (K,) -> probabilities (N, K)."""
    check_2d("logits_weak", logits_weak)
    check_class_vector("adjustment", adjustment, logits_weak.shape[1])
    with torch.no_grad():
        return torch.softmax(logits_weak.detach().float() - adjustment.float(), dim=1)


def symmetric_kl(p: Tensor, q: Tensor) -> Tensor:
    """½ KL(p ‖ q) + ½ KL(q ‖ p) of two class distributions (K,), each entry clamped at 1e-12 inside the logs (ACR's
    distance of the unlabeled estimate to an anchor). -> 0-d tensor, ≥ 0."""
    _check_distribution("p", p)
    _check_distribution("q", q, p.shape[0])
    p, q = p.float(), q.float()
    log_p, log_q = torch.log(p.clamp_min(EPS)), torch.log(q.clamp_min(EPS))
    return 0.5 * (p * (log_p - log_q)).sum() + 0.5 * (q * (log_q - log_p)).sum()


def anchor_distances(estimate: Tensor, labeled_prior: Tensor) -> Tensor:
    """Symmetric KL of the estimated unlabeled class distribution to ACR's three anchors: consistent (the labeled
    prior π), uniform (1/K) and reversed (π with its classes in reverse order: the protocol sorts classes head to
    tail). estimate, labeled_prior (K,) -> (3,) [d_con, d_uni, d_rev]."""
    _check_distribution("labeled_prior", labeled_prior)
    k = labeled_prior.shape[0]
    uniform = torch.full((k,), 1.0 / k, device=labeled_prior.device)
    anchors = (labeled_prior.float(), uniform, torch.flip(labeled_prior.float(), dims=[0]))
    return torch.stack([symmetric_kl(estimate, anchor) for anchor in anchors])


def acr_tau(distances: Tensor, tau_min: float = 0.0, tau_max: float = 2.0) -> Tensor:
    """ACR's adjustment intensity: τ = τ_min + (τ_max − τ_min) · softmax(d)_con, d = the (mean) anchor distances
    [d_con, d_uni, d_rev]: the farther the unlabeled data is from the labeled distribution, the more the
    pseudo-labels are debiased. distances (3,) -> 0-d tensor in [τ_min, τ_max]."""
    if not hasattr(distances, "shape") or tuple(distances.shape) != (3,):
        raise ValueError(f"distances must be [d_con, d_uni, d_rev] of shape (3,), got "
                         f"{tuple(getattr(distances, 'shape', ()))}")
    check_non_negative("tau_min", tau_min)
    if not tau_max >= tau_min:
        raise ValueError(f"tau_max must be >= tau_min, got tau_min={tau_min!r}, tau_max={tau_max!r}")
    return tau_min + (tau_max - tau_min) * torch.softmax(distances.float(), dim=0)[0]
