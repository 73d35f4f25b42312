"""Unlabeled-data terms of the classic consistency methods: Mean Teacher, UDA (with training-signal annealing) and
MixMatch (mixup, label guessing). Logits are (N, K); every target is computed without gradient; softmax math runs
in fp32 under autocast. USB (semilearn) is the reference for reductions and hyper-parameter names."""
from __future__ import annotations

import math
import random
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import (check_2d, check_class_dim, check_labels, check_same, check_temperature, check_unit_interval,
                      stack_rows)

TSA_SCHEDULES = ("linear", "exp", "log", "none")


def sharpen(probs: Tensor, temperature: float) -> Tensor:
    """p^(1/T) / Σ_k p_k^(1/T) along the last dimension (MixMatch's Sharpen). probs: (..., K) -> (..., K).
    Computed as softmax(log p / T) in fp32, which is the same thing without overflow for small T; T = 1 is the
    identity (for normalised p), T -> 0 tends to one-hot."""
    check_temperature("temperature", temperature)
    if not hasattr(probs, "ndim") or probs.ndim < 1:
        raise ValueError(f"probs must be a tensor (..., K), got {type(probs).__name__}")
    return torch.softmax(torch.log(probs.float()) / temperature, dim=-1)


def mean_teacher_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean Teacher consistency: squared difference of the class probabilities, softmax(s) − softmax(t), averaged
    over the K classes and then over the N samples, i.e. Σ_{n,k} (p_s − p_t)² / (N·K). That is USB's
    `consistency_loss(..., 'mse')` and the Mean Teacher code's `softmax_mse_loss / minibatch_size` alike.
    No gradient flows into the teacher. logits: (N, K). -> scalar."""
    check_2d("student_logits", student_logits)
    check_2d("teacher_logits", teacher_logits)
    check_same("student_logits", student_logits, "teacher_logits", teacher_logits)
    p_student = torch.softmax(student_logits.float(), dim=1)
    p_teacher = torch.softmax(teacher_logits.detach().float(), dim=1)
    return ((p_student - p_teacher) ** 2).mean()


def uda_loss(logits_weak: Tensor, logits_strong: Tensor, threshold: float = 0.8,
             temperature: float = 0.4) -> tuple[Tensor, Tensor]:
    """UDA's consistency term (USB `uda`: `p_cutoff` 0.8, `T` 0.4).
    target = softmax(weak / T) (sharpened, no gradient); mask = max softmax(weak) ≥ threshold (float (N,), from the
    unsharpened prediction); loss = mean over all N of mask · CE(target, strong) with CE = −Σ_k target_k
    log softmax(strong)_k. This is USB's cross-entropy form: it differs from the paper's KL(target ‖ p_strong) by the
    target's entropy, a constant without gradient. (USB's current uda.py hands probabilities to its pseudo-label hook
    with softmax=False, which skips T; we sharpen as the UDA paper and the T it configures intend.)
    logits: (N, K). -> (loss scalar, mask (N,))."""
    check_2d("logits_weak", logits_weak)
    check_2d("logits_strong", logits_strong)
    check_same("logits_weak", logits_weak, "logits_strong", logits_strong)
    check_unit_interval("threshold", threshold)
    check_temperature("temperature", temperature)
    with torch.no_grad():
        weak = logits_weak.detach().float()
        mask = (torch.softmax(weak, dim=1).max(dim=1).values >= threshold).float()
        target = torch.softmax(weak / temperature, dim=1)
    ce = -(target * F.log_softmax(logits_strong.float(), dim=1)).sum(dim=1)
    return (ce * mask).mean(), mask


def tsa_threshold(schedule: str, progress: float, num_classes: int) -> float:
    """Training-signal annealing threshold η_t = α_t (1 − 1/K) + 1/K, rising from about 1/K to 1 (UDA, USB `TSA`).
    progress = step / total steps in [0, 1]; α_t: 'linear' t, 'exp' exp(5 (t − 1)), 'log' 1 − exp(−5 t);
    'none' -> 1.0 (no annealing). Note exp starts at 1/K + e⁻⁵(1 − 1/K) and log ends at 1 − e⁻⁵(1 − 1/K)."""
    if schedule not in TSA_SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(TSA_SCHEDULES)}, got {schedule!r}")
    check_unit_interval("progress", progress)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if schedule == "none":
        return 1.0
    alpha = {"linear": progress, "exp": math.exp(5.0 * (progress - 1.0)),
             "log": 1.0 - math.exp(-5.0 * progress)}[schedule]
    return alpha * (1.0 - 1.0 / num_classes) + 1.0 / num_classes


def tsa_mask(logits: Tensor, targets: Tensor, threshold: float) -> Tensor:
    """Which labeled samples keep their supervised loss under TSA: 1 where the predicted probability of the correct
    class softmax(logits)[n, y_n] ≤ threshold, 0 where the model is already more sure than η_t (UDA paper; USB
    compares the max probability instead, which differs only on misclassified samples). No gradient.
    logits: (N, K); targets: (N,) class indices. -> float mask (N,). The UDA code then averages CE · mask over the
    kept samples (Σ / max(Σ mask, 1)); USB averages over all N."""
    check_2d("logits", logits)
    check_labels("targets", targets, logits.shape[0], logits.shape[1])
    check_unit_interval("threshold", threshold)
    with torch.no_grad():
        correct = torch.softmax(logits.detach().float(), dim=1).gather(1, targets.long().view(-1, 1)).squeeze(1)
        return (correct <= threshold).float()


def _beta_sample(alpha: float, generator: Optional[torch.Generator]) -> float:
    """One draw of Beta(α, α), reproducible from `generator` (or torch's global generator): torch has no seeded Beta
    sampler, so a seed is drawn from the torch generator and fed to a private Python RNG."""
    device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=device))
    return random.Random(seed).betavariate(alpha, alpha)


def mixup(x: Tensor, targets: Tensor, alpha: float, generator: Optional[torch.Generator] = None
          ) -> tuple[Tensor, Tensor, float]:
    """MixMatch's mixup: λ ~ Beta(α, α), λ' = max(λ, 1 − λ) ≥ 0.5 (so each mixed row stays closer to its own input);
    a random permutation π of the N rows; mixed x = λ' x + (1 − λ') x[π], mixed targets likewise. alpha 0 -> λ' = 1
    (no mixing; USB's convention). Draws (λ, then π) come from `generator` if given, else torch's global RNG.
    x: (N, ...) inputs; targets: (N, K) soft or one-hot targets. -> (mixed x, mixed targets, λ')."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
        raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
    check_2d("targets", targets)
    if not hasattr(x, "ndim") or x.ndim < 1 or x.shape[0] != targets.shape[0]:
        raise ValueError(f"x and targets must have the same number of rows, got {tuple(getattr(x, 'shape', ()))} "
                         f"and {tuple(targets.shape)}")
    lam = _beta_sample(float(alpha), generator) if alpha > 0 else 1.0
    lam = max(lam, 1.0 - lam)
    device = generator.device if generator is not None else x.device
    order = torch.randperm(x.shape[0], generator=generator, device=device).to(x.device)
    mixed_x = lam * x + (1.0 - lam) * x[order]
    mixed_targets = lam * targets + (1.0 - lam) * targets[order]
    return mixed_x, mixed_targets, lam


def mixmatch_targets(probs_k_views: Union[Tensor, Sequence[Tensor]], temperature: float = 0.5) -> Tensor:
    """MixMatch label guessing: the average of the class probabilities over the K augmentations of each unlabeled
    image, renormalised, then sharpened with temperature T (USB `T` 0.5). No gradient.
    probs_k_views: (V, N, C) tensor or a sequence of V tensors (N, C). -> (N, C)."""
    check_temperature("temperature", temperature)
    stacked = stack_rows("probs_k_views", probs_k_views, "view", "(V, N, C)")
    with torch.no_grad():
        mean = stacked.detach().float().mean(dim=0)
        mean = mean / mean.sum(dim=1, keepdim=True)
        return sharpen(mean, temperature)


def mixmatch_loss(logits_x: Tensor, targets_x: Tensor, logits_u: Tensor, targets_u: Tensor) -> tuple[Tensor, Tensor]:
    """MixMatch's two terms on the mixed batch (targets without gradient):
    loss_x = mean over the B labeled rows of −Σ_k targets_x log softmax(logits_x) (soft-target cross-entropy);
    loss_u = Σ_{n,k} (softmax(logits_u) − targets_u)² / (U·K): squared error averaged over classes, then rows
    (USB's `consistency_loss(..., 'mse')`; the paper's ‖·‖² / (K·|U'|)). The caller weights loss_u by λ_u (USB 100)
    times a linear ramp-up. logits_x, targets_x: (B, K); logits_u, targets_u: (U, K). -> (loss_x, loss_u)."""
    for name, tensor in (("logits_x", logits_x), ("targets_x", targets_x), ("logits_u", logits_u),
                         ("targets_u", targets_u)):
        check_2d(name, tensor)
    if logits_x.shape != targets_x.shape:
        raise ValueError(f"logits_x and targets_x must have the same shape, got {tuple(logits_x.shape)} and "
                         f"{tuple(targets_x.shape)}")
    if logits_u.shape != targets_u.shape:
        raise ValueError(f"logits_u and targets_u must have the same shape, got {tuple(logits_u.shape)} and "
                         f"{tuple(targets_u.shape)}")
    check_class_dim("logits_x", logits_x, "logits_u", logits_u)
    loss_x = -(targets_x.detach().float() * F.log_softmax(logits_x.float(), dim=1)).sum(dim=1).mean()
    loss_u = ((torch.softmax(logits_u.float(), dim=1) - targets_u.detach().float()) ** 2).mean()
    return loss_x, loss_u
