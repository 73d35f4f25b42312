"""Decoupled knowledge distillation (Zhao et al. 2022, CVPR): the KD loss split into its target-class part (TCKD:
binary target / non-target distributions) and its non-target part (NCKD: the distribution among the other classes),
weighted α and β independently instead of NCKD being scaled down by the teacher's (1 − p_t). Everything else —
teachers from stages or checkpoints (one, or several), unlabeled images, the FitNets hint — is KD's (kd.py).

loss = ce_weight · CE(s, y) + min(epoch / warmup, 1) · DKD(s, t, y; α, β, T) (mdistiller's CE_WEIGHT, ALPHA, BETA,
T, WARMUP). Several teachers: the weighted mean of one DKD term per teacher. Unlabeled images (use_unlabeled) have
no label: their target class is the (weighted) teachers' arg-max."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field
from torch import Tensor

from ..losses import dkd_loss
from .base import Progress
from .kd import KD_SGD, KDConfig, KnowledgeDistillation
from .registry import register


class DKDConfig(KDConfig):
    """DKD: ce_weight · CE + warm-up · (alpha · TCKD + beta · NCKD) · T²."""

    method: Literal["dkd"]

    recommended = KD_SGD
    recommended_source = ("DKD (Zhao et al. 2022, mdistiller CIFAR-100 configs): SGD momentum 0.9, lr 0.05, weight decay 5e-4, lr × 0.1 at epochs 150/180/210 of 240")
    alpha: float = Field(1.0, ge=0, description="weight of the target-class term TCKD (mdistiller ALPHA)")
    beta: float = Field(8.0, ge=0, description="weight of the non-target-class term NCKD (mdistiller BETA)")
    ce_weight: float = Field(1.0, ge=0, description="weight of cross-entropy on the labels (mdistiller CE_WEIGHT)")
    warmup_epochs: float = Field(20.0, ge=0, description="the DKD term ramps linearly from 0 to 1 over these epochs "
                                                         "(mdistiller WARMUP); 0 = no ramp")


@register("dkd", DKDConfig)
class DecoupledKD(KnowledgeDistillation):

    def loss_weights(self, progress: Progress) -> tuple[float, float]:
        """(ce_weight, linear warm-up of the DKD term over `warmup_epochs`, in fractional epochs)."""
        warmup = self.cfg.warmup_epochs
        epochs = progress.step / max(1, progress.steps_per_epoch)
        return self.cfg.ce_weight, (min(epochs / warmup, 1.0) if warmup > 0 else 1.0)

    def soft_loss(self, student_logits: Tensor, teacher_logits: list[Tensor], targets: Optional[Tensor]) -> Tensor:
        """Weighted mean over teachers of dkd_loss(s, t_i, targets); targets None (unlabeled images) -> the arg-max
        of the teachers' weighted mean probabilities."""
        cfg, weights = self.cfg, self.teacher_weights
        total = sum(weights)
        if targets is None:
            with torch.no_grad():
                mean = sum((w / total) * torch.softmax(t.float(), dim=1) for w, t in zip(weights, teacher_logits))
                targets = mean.argmax(dim=1)
        terms = [(w / total) * dkd_loss(student_logits, t, targets, cfg.alpha, cfg.beta, cfg.kd_temperature)
                 for w, t in zip(weights, teacher_logits) if w > 0]
        return sum(terms)
