"""Soft-target distillation losses: Hinton KD, DINO self-distillation and iBOT's masked-patch distillation."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ._checks import check_2d, check_same, check_temperature


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
    center = center.detach().float().view(1, 1, k)
    teacher_probs = F.softmax((teacher_patch_logits.detach().float() - center) / teacher_temp, dim=-1)
    student_logp = F.log_softmax(student_patch_logits.float() / student_temp, dim=-1)
    per_patch = -(teacher_probs * student_logp).sum(dim=-1)  # (N, L)
    weight = mask.detach().float()
    per_image = (per_patch * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)
    return per_image.mean()
