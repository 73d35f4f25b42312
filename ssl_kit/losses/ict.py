"""Interpolation consistency training (Verma et al. 2019, IJCAI; the authors' code vikasverma1077/ICT): the student's
prediction on a mixup of two unlabeled images is pulled towards the same mixup of an EMA teacher's predictions on
them, with squared error. λ ~ Beta(α, α) as drawn (no max(λ, 1 − λ) as in MixMatch), one λ per batch, each image
mixed with a random partner of the same batch."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from ._checks import check_2d
from .semi_supervised import _beta_sample

TARGET_MIXINGS = ("logits", "probabilities")


def ict_mix_coefficient(alpha: float, generator: Optional[torch.Generator] = None) -> float:
    """λ ~ Beta(α, α) (the ICT code's `np.random.beta(alpha, alpha)`); alpha 0 -> 1.0 (no mixing, as the ICT code).
    Reproducible from `generator` (else torch's global RNG). -> float in [0, 1]."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
        raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
    return _beta_sample(float(alpha), generator) if alpha > 0 else 1.0


def _check_mix(lam: float, order: Tensor, n: int) -> None:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be a number in [0, 1], got {lam!r}")
    if not isinstance(order, Tensor) or order.dtype != torch.int64 or order.shape != (n,):
        raise ValueError(f"order must be an int64 tensor of shape ({n},) (a permutation of the rows), got "
                         f"{getattr(order, 'dtype', type(order).__name__)} {tuple(getattr(order, 'shape', ()))}")


def interpolate(x: Tensor, lam: float, order: Tensor) -> Tensor:
    """Mix_λ(x, x[order]) = λ · x + (1 − λ) · x[order], row by row. x: (N, ...); order: (N,) int64 permutation of the
    rows. -> (N, ...)."""
    if not hasattr(x, "ndim") or x.ndim < 1:
        raise ValueError(f"x must be a tensor (N, ...), got {type(x).__name__}")
    _check_mix(lam, order, x.shape[0])
    return lam * x + (1.0 - lam) * x[order]


def ict_targets(teacher_logits: Tensor, lam: float, order: Tensor,
                target_mixing: Literal["logits", "probabilities"] = "logits") -> Tensor:
    """The mixed teacher prediction, without gradient: 'probabilities': Mix_λ(softmax(t), softmax(t)[order]) (the
    paper's Mix_λ(f_θ'(u_j), f_θ'(u_k))); 'logits': softmax(Mix_λ(t, t[order])) (the authors' code mixes the
    teacher's logits, `mixup_data(u, ema_logit_unlabeled, …)`, then softmax_mse_loss applies the softmax).
    teacher_logits: (N, K); order: (N,) int64 permutation. -> (N, K) float32 class probabilities."""
    check_2d("teacher_logits", teacher_logits)
    if target_mixing not in TARGET_MIXINGS:
        raise ValueError(f"target_mixing must be one of {', '.join(TARGET_MIXINGS)}, got {target_mixing!r}")
    with torch.no_grad():
        t = teacher_logits.detach().float()
        if target_mixing == "logits":
            return torch.softmax(interpolate(t, lam, order), dim=1)
        return interpolate(torch.softmax(t, dim=1), lam, order)


def ict_loss(mixed_logits: Tensor, teacher_logits: Tensor, lam: float, order: Tensor,
             target_mixing: Literal["logits", "probabilities"] = "logits") -> Tensor:
    """ICT's consistency term: Σ_{n,k} (softmax(mixed_logits) − target)² / (N·K), target = `ict_targets` (no
    gradient): the ICT code's softmax_mse_loss / (K · minibatch) and the reduction of `mean_teacher_loss`.
    mixed_logits: (N, K) student logits on interpolate(u, lam, order); teacher_logits: (N, K) EMA teacher logits
    on u; order: (N,) int64 permutation. -> scalar (float32)."""
    check_2d("mixed_logits", mixed_logits)
    check_2d("teacher_logits", teacher_logits)
    if mixed_logits.shape != teacher_logits.shape:
        raise ValueError(f"mixed_logits and teacher_logits must have the same shape, got {tuple(mixed_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    target = ict_targets(teacher_logits, lam, order, target_mixing)
    return ((torch.softmax(mixed_logits.float(), dim=1) - target) ** 2).mean()
