"""Mean Teacher (Tarvainen & Valpola 2017): the teacher is an exponential moving average of the student's weights;
the student's class probabilities on one weak view of an unlabeled image are pulled towards the teacher's on another
weak view (squared error, `mean_teacher_loss`), weighted by λ_u times a ramp-up (sigmoid, as in the paper; USB ramps
linearly over `unsup_warmup`). The teacher's decay warms up as in the reference code: min(1 − 1/(t + 1), ema_m)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..data.loader import Batch
from ..losses import linear_rampup, mean_teacher_loss, sigmoid_rampup
from .base import Progress
from .momentum import frozen_copy, update_momentum_pairs
from .registry import register
from .semi import USB_SGD, SemiSupervisedConfig, SemiSupervisedMethod


class MeanTeacherConfig(SemiSupervisedConfig):
    method: Literal["mean_teacher"]

    recommended = USB_SGD
    recommended_source = ("USB's Mean Teacher config: SGD Nesterov momentum 0.9, lr 0.03 (no batch scaling), weight decay 5e-4, lr · cos(7πk/16K)")
    mu: int = Field(1, ge=1, description="unlabeled batch = mu × labeled batch (USB uratio 1)")
    lambda_u: float = Field(50.0, ge=0, description="weight of the consistency loss (USB ulb_loss_ratio 50)")
    ema_m: float = Field(0.999, ge=0, lt=1, description="teacher = EMA of the student with this decay (USB ema_m)")
    unsup_warmup: float = Field(0.4, ge=0, le=1,
                                description="fraction of the steps the ramp-up lasts (USB unsup_warm_up)")
    rampup: Literal["sigmoid", "linear"] = Field(
        "sigmoid", description="shape of the ramp-up: sigmoid exp(−5(1 − t)²) (Mean Teacher paper) or linear (USB)")


@register("mean_teacher", MeanTeacherConfig)
class MeanTeacher(SemiSupervisedMethod):
    """Mean Teacher: squared error between the student's and an EMA teacher's class probabilities on two weak
    views of unlabeled images, ramped up (sigmoid or linear)."""

    def __init__(self, cfg, backbone: nn.Module, info, num_unlabeled: int = 0) -> None:
        super().__init__(cfg, backbone, info, num_unlabeled)
        self.teacher = frozen_copy(self.net)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.net, self.teacher)]

    def teacher_momentum(self, step: int) -> float:
        """Decay after optimizer step `step` (0-based): min(1 − 1/(step + 2), ema_m), i.e. the reference code's
        min(1 − 1/(global_step + 1), α) with global_step counted from 1, so early teachers follow the student."""
        return min(1.0 - 1.0 / (step + 2), self.cfg.ema_m)

    def after_optimizer_step(self, progress: Progress) -> None:
        """A constant decay (with the reference warm-up), not the cosine ramp to 1 of the self-supervised methods."""
        self.current_momentum = self.teacher_momentum(progress.step)
        update_momentum_pairs(self.momentum_pairs(), self.current_momentum)

    def ramp(self, progress: Progress) -> float:
        length = self.cfg.unsup_warmup * progress.total_steps
        return (sigmoid_rampup if self.cfg.rampup == "sigmoid" else linear_rampup)(progress.step, length)

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        n = batch.x.shape[0]
        logits = self.net(torch.cat([self.weak_view(batch.x), self.weak_view(batch.u)]))
        logits_x, logits_student = logits[:n], logits[n:]
        with torch.no_grad():
            logits_teacher = self.teacher(self.weak_view(batch.u)).float()  # another weak view, no gradient
            probs = torch.softmax(logits_teacher, dim=1)
            self.track_pseudo_labels(probs, torch.ones_like(probs[:, 0]), batch.u_y)
        supervised = F.cross_entropy(logits_x.float(), batch.y)
        consistency = mean_teacher_loss(logits_student, logits_teacher)
        weight = cfg.lambda_u * self.ramp(progress)
        return {"loss": supervised + weight * consistency, "supervised_loss": supervised.detach(),
                "unsupervised_loss": consistency.detach(), "unsup_weight": torch.tensor(weight)}
