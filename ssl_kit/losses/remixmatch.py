"""ReMixMatch (Berthelot, Carlini, Cubuk, Kurakin, Sohn, Zhang & Raffel, ICLR 2020, "ReMixMatch: semi-supervised
learning with distribution alignment and augmentation anchoring"), as USB runs it (semilearn `remixmatch`):
distribution alignment of the weak view's prediction, the guess (aligned, then sharpened as MixMatch) and the three
soft cross-entropy terms (mixed labeled rows, mixed unlabeled rows, the first strong view before mixing).

Shapes: probs (N, K) class probabilities of the weak unlabeled view; p_model, p_target (K,) class distributions;
logits and targets (·, K). Targets get no gradient; softmax math runs in fp32."""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_2d, check_class_dim, check_class_vector, check_temperature
from .pseudo_label import consistency_loss
from .semi_supervised import sharpen

ALIGNMENT_EPS = 1e-6  # USB DistAlignEMAHook: p · (p_target + 1e-6) / (p_model + 1e-6)


def remixmatch_distribution_alignment(probs: Tensor, p_model: Tensor, p_target: Tensor) -> Tensor:
    """ReMixMatch's distribution alignment (paper §3.2, USB's DistAlignEMAHook formula), without gradient:
    p̃ = normalise(p ⊙ (p_target + ε) / (p_model + ε)), ε = 1e-6, rows summing to 1. p_model: the running mean of
    the model's predictions on unlabeled images; p_target: the labeled class distribution (paper, USB 'gt') or
    uniform. probs: (N, K); p_model, p_target: (K,). -> (N, K)."""
    check_2d("probs", probs)
    k = probs.shape[1]
    for name, dist in (("p_model", p_model), ("p_target", p_target)):
        check_class_vector(name, dist, k, " of probs")
    dtype = torch.promote_types(probs.dtype, torch.float32)  # fp16/bf16 in fp32; float64 stays float64
    with torch.no_grad():
        ratio = (p_target.detach().to(dtype) + ALIGNMENT_EPS) / (p_model.detach().to(dtype) + ALIGNMENT_EPS)
        aligned = probs.detach().to(dtype) * ratio
        return aligned / aligned.sum(dim=1, keepdim=True)


def remixmatch_guess(probs: Tensor, p_model: Tensor, p_target: Tensor, temperature: float = 0.5) -> Tensor:
    """The label guess of the weak view (no gradient): distribution-aligned, then sharpened,
    sharpen(p̃, T) = p̃^(1/T) / Σ_k p̃_k^(1/T) (USB T 0.5). probs: (N, K). -> (N, K)."""
    check_temperature("temperature", temperature)
    return sharpen(remixmatch_distribution_alignment(probs, p_model, p_target), temperature)


def remixmatch_loss(logits_x: Tensor, targets_x: Tensor, logits_u: Tensor, targets_u: Tensor,
                    logits_strong: Tensor, guess: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ReMixMatch's three cross-entropies, each H(t, softmax(logits)) = −Σ_k t_k log softmax(logits)_k averaged
    over its rows (USB ce_loss with soft targets; the paper's L_X, L_U and L_Û1):
    supervised on the B mixed labeled rows (logits_x, targets_x (B, K)), unsupervised on the mixed unlabeled rows
    (logits_u, targets_u (U, K)), strong on the first strong view before mixing towards the guess (logits_strong,
    guess (N, K)). The caller weights them 1, λ_u · ramp and kl_loss_ratio · ramp. -> (supervised, unsupervised,
    strong)."""
    pairs = (("logits_x", logits_x, "targets_x", targets_x), ("logits_u", logits_u, "targets_u", targets_u),
             ("logits_strong", logits_strong, "guess", guess))
    for name, logits, target_name, targets in pairs:
        check_2d(name, logits)
        check_2d(target_name, targets)
        if logits.shape != targets.shape:
            raise ValueError(f"{name} and {target_name} must have the same shape, got {tuple(logits.shape)} and "
                             f"{tuple(targets.shape)}")
    check_class_dim("logits_x", logits_x, "logits_u", logits_u)
    check_class_dim("logits_x", logits_x, "logits_strong", logits_strong)
    return (consistency_loss(logits_x, targets_x.float()), consistency_loss(logits_u, targets_u.float()),
            consistency_loss(logits_strong, guess.float()))
