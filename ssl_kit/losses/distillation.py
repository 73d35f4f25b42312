"""Distillation losses: Hinton KD, DINO self-distillation, iBOT's masked-patch distillation, decoupled KD (DKD),
multi-teacher KD and FitNets hints."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_2d, check_labels, check_same, check_temperature


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton KD: KL(softmax(t/T) ‖ softmax(s/T)) summed over classes, averaged over the batch, times T².
    The T² keeps gradient magnitudes comparable across temperatures. No gradient flows into the teacher.
    logits: (N, K). -> scalar."""
    check_2d("student_logits", student_logits)
    check_2d("teacher_logits", teacher_logits)
    check_same("student_logits", student_logits, "teacher_logits", teacher_logits)
    check_temperature("temperature", temperature)
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    return kl.mean() * temperature ** 2


def dino_loss(student_out: list[Tensor], teacher_out: list[Tensor], center: Tensor, student_temp: float = 0.1,
              teacher_temp: float = 0.04) -> Tensor:
    """DINO: teacher probs softmax((t − center)/teacher_temp) without gradient; cross-entropy
    −Σ p_t log softmax(s/student_temp), averaged over the batch and over all (teacher view i, student view j)
    pairs with i ≠ j. student_out, teacher_out: lists of (N, K); center: (K,) or (1, K). -> scalar."""
    if not student_out or not teacher_out:
        raise ValueError("dino_loss needs at least one student and one teacher view")
    check_temperature("student_temp", student_temp)
    check_temperature("teacher_temp", teacher_temp)
    shape = teacher_out[0].shape
    for i, view in enumerate(list(student_out) + list(teacher_out)):
        check_2d(f"view {i}", view)
        if view.shape != shape:
            raise ValueError(f"every view must have shape {tuple(shape)}, view {i} has {tuple(view.shape)}")
    if center.numel() != shape[1]:
        raise ValueError(f"center must have {shape[1]} entries, got shape {tuple(center.shape)}")
    center = center.detach().float().view(1, -1)
    teacher_probs = [F.softmax((t.detach().float() - center) / teacher_temp, dim=1) for t in teacher_out]
    student_logp = [F.log_softmax(s.float() / student_temp, dim=1) for s in student_out]
    total, pairs = 0.0, 0
    for i, p_t in enumerate(teacher_probs):
        for j, log_p_s in enumerate(student_logp):
            if i == j:
                continue
            total = total + (-(p_t * log_p_s).sum(dim=1)).mean()
            pairs += 1
    if pairs == 0:
        raise ValueError("dino_loss needs at least one (teacher i, student j) pair with i != j")
    return total / pairs


def ibot_patch_loss(student_patch_logits: Tensor, teacher_patch_logits: Tensor, mask: Tensor, center: Tensor,
                    student_temp: float = 0.1, teacher_temp: float = 0.04) -> Tensor:
    """iBOT's masked-patch self-distillation (reference semantics). student_patch_logits, teacher_patch_logits:
    (N, L, K) logits of the L patch tokens (the student saw the masked image, the teacher the unmasked one);
    mask: (N, L) bool or 0/1 float, 1 = masked; center: (K,) or broadcastable to (1, 1, K).
    Teacher probs = softmax((t − center)/teacher_temp) without gradient; per patch
    CE = −Σ_k p_t log softmax(s/student_temp); each image's CE is averaged over its masked patches, then the mean
    is taken over all N images (an image with no masked patch contributes 0, as in the reference). For several
    crops, stack them along N (every crop has N images, so this equals iBOT's mean over crops). -> scalar."""
    if student_patch_logits.ndim != 3 or student_patch_logits.shape != teacher_patch_logits.shape:
        raise ValueError(f"student_patch_logits and teacher_patch_logits must both be (N, L, K), got "
                         f"{tuple(student_patch_logits.shape)} and {tuple(teacher_patch_logits.shape)}")
    check_temperature("student_temp", student_temp)
    check_temperature("teacher_temp", teacher_temp)
    n, length, k = student_patch_logits.shape
    if mask.shape != (n, length):
        raise ValueError(f"mask must be (N, L) = {(n, length)}, got {tuple(mask.shape)}")
    if center.numel() != k:
        raise ValueError(f"center must have {k} entries, got shape {tuple(center.shape)}")
    center = center.detach().float().view(1, k)
    weight = mask.detach().float()
    image, patch = weight.nonzero(as_tuple=True)  # only masked patches enter the loss: softmax over those alone
    teacher_probs = F.softmax((teacher_patch_logits.detach()[image, patch].float() - center) / teacher_temp, dim=-1)
    student_logp = F.log_softmax(student_patch_logits[image, patch].float() / student_temp, dim=-1)
    per_patch = -(teacher_probs * student_logp).sum(dim=-1) * weight[image, patch]  # (masked patches,)
    per_image = per_patch.new_zeros(n).index_add(0, image, per_patch) / weight.sum(dim=1).clamp(min=1.0)
    return per_image.mean()


def _binary_and_other_log_probs(logits: Tensor, is_target: Tensor) -> tuple[Tensor, Tensor]:
    """logits (N, K) already divided by T, is_target (N, K) bool one-hot of the labels -> log [p_t, 1 − p_t] (N, 2)
    and the log-softmax over the K − 1 non-target classes alone (N, K) with 0 in the target column, both exact in log
    space (no −1000 masking trick). The target column is filled after the −inf, so no NaN reaches the gradient."""
    log_p = F.log_softmax(logits, dim=1)
    log_target = (log_p * is_target).sum(dim=1, keepdim=True)
    log_rest = torch.logsumexp(log_p.masked_fill(is_target, float("-inf")), dim=1, keepdim=True)
    others = logits.masked_fill(is_target, float("-inf"))
    log_others = (others - torch.logsumexp(others, dim=1, keepdim=True)).masked_fill(is_target, 0.0)
    return torch.cat([log_target, log_rest], dim=1), log_others


def _kl_rows(log_p: Tensor, log_q: Tensor, keep: Optional[Tensor] = None) -> Tensor:
    """KL(p ‖ q) per row from log-probabilities (N, C) -> (N,), over the columns where `keep` (N, C) is True."""
    terms = log_p.exp() * (log_p - log_q)
    return (terms if keep is None else terms * keep).sum(dim=1)


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, alpha: float = 1.0, beta: float = 8.0,
             temperature: float = 4.0) -> Tensor:
    """Decoupled KD (Zhao et al. 2022): α · TCKD + β · NCKD, each × T² and averaged over the batch (mdistiller's
    defaults α 1, β 8, T 4; its CE term and warm-up of the weight stay with the method).
    With b = [p_t, 1 − p_t] the binary target/non-target probabilities of softmax(logits / T) and p̂ the softmax over
    the K − 1 non-target classes alone: TCKD = KL(b_teacher ‖ b_student), NCKD = KL(p̂_teacher ‖ p̂_student).
    Per sample, KD = TCKD + (1 − p_t^teacher) · NCKD (the paper's decomposition); DKD drops the (1 − p_t) coupling.
    No gradient into the teacher. logits: (N, K), K ≥ 2; targets: (N,) class indices. -> scalar."""
    check_2d("student_logits", student_logits)
    check_2d("teacher_logits", teacher_logits)
    check_same("student_logits", student_logits, "teacher_logits", teacher_logits)
    n, k = student_logits.shape
    if k < 2:
        raise ValueError(f"dkd_loss needs at least 2 classes, got logits of shape {tuple(student_logits.shape)}")
    check_labels("targets", targets, n, k)
    check_temperature("temperature", temperature)
    for name, value in (("alpha", alpha), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    is_target = F.one_hot(targets.long(), k).bool()
    binary_s, others_s = _binary_and_other_log_probs(student_logits.float() / temperature, is_target)
    binary_t, others_t = _binary_and_other_log_probs(teacher_logits.detach().float() / temperature, is_target)
    tckd = _kl_rows(binary_t, binary_s).mean()
    nckd = _kl_rows(others_t, others_s, ~is_target).mean()
    return (alpha * tckd + beta * nckd) * temperature ** 2


def multi_teacher_kd_loss(student_logits: Tensor, teacher_logits: Sequence[Tensor],
                          weights: Optional[Sequence[float]] = None, temperature: float = 4.0) -> Tensor:
    """KD from an ensemble: soft targets q = Σ_i w_i softmax(t_i / T) with the weights normalised to sum 1 (None =
    equal), loss = KL(q ‖ softmax(s / T)) summed over classes, averaged over the batch, × T² (as `kd_loss`, which it
    equals for one teacher). No gradient into the teachers. student_logits: (N, K); teacher_logits: list of (N, K);
    weights: one number ≥ 0 per teacher, not all 0. -> scalar."""
    check_2d("student_logits", student_logits)
    check_temperature("temperature", temperature)
    teachers = list(teacher_logits)
    if not teachers:
        raise ValueError("multi_teacher_kd_loss needs at least one teacher")
    for i, teacher in enumerate(teachers):
        check_2d(f"teacher_logits[{i}]", teacher)
        check_same("student_logits", student_logits, f"teacher_logits[{i}]", teacher)
    if weights is None:
        weights = [1.0] * len(teachers)
    weights = [float(w) for w in weights]
    if len(weights) != len(teachers):
        raise ValueError(f"weights must have one entry per teacher ({len(teachers)}), got {len(weights)}")
    if any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 and not all 0, got {weights}")
    total = sum(weights)
    target = sum((w / total) * torch.softmax(t.detach().float() / temperature, dim=1)
                 for w, t in zip(weights, teachers))
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    kl = (torch.xlogy(target, target) - target * log_p_student).sum(dim=1)
    return kl.mean() * temperature ** 2


def hint_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """FitNets hint loss: mean squared error between the student's regressed features and the teacher's hint layer,
    averaged over every element (N·C·H·W or N·D), as RepDistiller's and torchdistill's `HintLoss` (nn.MSELoss);
    the FitNets paper's ½‖·‖² sum differs only by a constant factor. The shapes must match exactly: the caller's
    regressor (a 1×1 conv + BN for maps, a linear layer for vectors, owned by the method) maps the student's
    channels to the teacher's. No gradient into the teacher. features: (N, ...) each. -> scalar."""
    for name, tensor in (("student_features", student_features), ("teacher_features", teacher_features)):
        if not hasattr(tensor, "ndim") or tensor.ndim < 2:
            raise ValueError(f"{name} must be a tensor (N, ...) with at least 2 dimensions, got shape "
                             f"{tuple(getattr(tensor, 'shape', ()))}")
    if student_features.shape != teacher_features.shape:
        raise ValueError(f"student_features {tuple(student_features.shape)} and teacher_features "
                         f"{tuple(teacher_features.shape)} must have the same shape: map the student's features "
                         f"to the teacher's with a regressor first")
    return F.mse_loss(student_features.float(), teacher_features.detach().float())
