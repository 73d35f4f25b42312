"""SimMatch (Zheng et al. 2022, "SimMatch: semi-supervised learning with similarity matching"): label propagation
between the class space and the instance space of a labeled memory bank, and the instance consistency loss.

Shapes: embeddings (N, D) and bank (M, D) are L2-normalised by the caller (the projection head's output; the bank
holds the EMA/weak embeddings of labeled images), bank_labels (M,) their classes in [0, K), class_probs (N, K) the
weak view's class probabilities (after distribution alignment where used)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_2d, check_labels, check_temperature, check_unit_interval


def _check_bank(embeddings: Tensor, bank: Tensor) -> None:
    check_2d("embeddings", embeddings)
    check_2d("bank", bank)
    if embeddings.shape[1] != bank.shape[1]:
        raise ValueError(f"embeddings and bank must have the same dimension D, got {tuple(embeddings.shape)} and "
                         f"{tuple(bank.shape)}")
    if bank.shape[0] == 0:
        raise ValueError("bank is empty: SimMatch needs at least one labeled embedding in its memory bank")


def simmatch_unfold_aggregate(embeddings: Tensor, bank: Tensor, bank_labels: Tensor, class_probs: Tensor,
                              temperature: float = 0.1, smoothing_alpha: float = 0.9) -> tuple[Tensor, Tensor]:
    """SimMatch's pseudo-labels, without gradient.

    q = softmax(embeddings @ bankᵀ / T) (N, M): the weak view's similarity distribution over the labeled bank.
    Unfolding (class -> instance): p^unfold[n, m] = class_probs[n, bank_labels[m]], and the calibrated instance
    pseudo-label q̂ = normalise(q ⊙ p^unfold) (N, M): similarities to bank items whose class the classifier doubts
    are scaled down.
    Aggregation (instance -> class): q^agg[n, c] = Σ_{m: bank_labels[m] = c} q[n, m] (N, K), and the class
    pseudo-label p̂ = α · class_probs + (1 − α) · q^agg with α = smoothing_alpha (USB default 0.9; the released
    SimMatch code's `c_smooth`); α = 1 returns class_probs unchanged. Rows of both outputs sum to 1.
    temperature: T of the instance similarities (SimMatch 0.1). -> (q̂ (N, M), p̂ (N, K))."""
    _check_bank(embeddings, bank)
    check_2d("class_probs", class_probs)
    if class_probs.shape[0] != embeddings.shape[0]:
        raise ValueError(f"class_probs must have one row per embedding, got {tuple(class_probs.shape)} for "
                         f"embeddings {tuple(embeddings.shape)}")
    check_labels("bank_labels", bank_labels, bank.shape[0], class_probs.shape[1])
    check_temperature("temperature", temperature)
    check_unit_interval("smoothing_alpha", smoothing_alpha)
    with torch.no_grad():
        probs = class_probs.detach().float()
        labels = bank_labels.long()
        similarity = torch.softmax(embeddings.detach().float() @ bank.detach().float().T / temperature, dim=1)
        unfolded = probs[:, labels]  # (N, M)
        instance = similarity * unfolded
        instance = instance / instance.sum(dim=1, keepdim=True).clamp_min(1e-12)
        aggregated = torch.zeros_like(probs).index_add_(1, labels, similarity)  # (N, K)
        classes = smoothing_alpha * probs + (1.0 - smoothing_alpha) * aggregated
    return instance, classes


def simmatch_in_loss(student_embeddings: Tensor, bank: Tensor, instance_targets: Tensor,
                     temperature: float = 0.1) -> Tensor:
    """SimMatch's instance consistency L_in: cross-entropy between the calibrated instance pseudo-label q̂ (from
    `simmatch_unfold_aggregate` on the weak view, no gradient) and the strong view's similarity distribution
    softmax(student_embeddings @ bankᵀ / T), −Σ_m q̂ log p_s summed over the bank, averaged over N. The bank gets no
    gradient. student_embeddings: (N, D) normalised; bank: (M, D); instance_targets: (N, M). -> scalar."""
    _check_bank(student_embeddings, bank)
    check_2d("instance_targets", instance_targets)
    expected = (student_embeddings.shape[0], bank.shape[0])
    if tuple(instance_targets.shape) != expected:
        raise ValueError(f"instance_targets must have shape (N, M) = {expected}, got {tuple(instance_targets.shape)}")
    check_temperature("temperature", temperature)
    log_p = F.log_softmax(student_embeddings.float() @ bank.detach().float().T / temperature, dim=1)
    return -(instance_targets.detach().float() * log_p).sum(dim=1).mean()
