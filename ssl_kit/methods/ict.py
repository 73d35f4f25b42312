"""Interpolation consistency training (Verma et al. 2019, IJCAI), as the authors' code runs it on CIFAR-10
(vikasverma1077/ICT, README: --pseudo_label mean_teacher --mixup_consistency 100 --mixup_sup_alpha 1.0
--mixup_usup_alpha 1.0 --consistency_rampup_ends 100 of 400 epochs --ema_decay 0.999): one weak view u of the
unlabeled batch; an EMA teacher (Mean Teacher's, same decay warm-up) predicts on u without gradient; the student
predicts on Mix_λ(u, u[π]), λ ~ Beta(α, α), π a random permutation of the batch, and is pulled towards the same mix
of the teacher's predictions (squared error, `ict_loss`), weighted by λ_u times a sigmoid ramp-up. The labeled batch
is trained with mixup cross-entropy (`sup_mixup_alpha`; 0 = plain CE, the paper's Algorithm 1). USB has no ICT."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..data.loader import Batch
from ..losses import ict_loss, ict_mix_coefficient, interpolate, mixup
from .base import Progress
from .mean_teacher import MeanTeacher, MeanTeacherConfig
from .registry import register
from .semi import USB_SGD


class ICTConfig(MeanTeacherConfig):
    """ICT: CE (mixup) + λ_u · ramp · MSE(softmax(student(Mix_λ(u, u[π]))), Mix_λ of the teacher's predictions)."""

    method: Literal["ict"]

    recommended = USB_SGD
    recommended_source = ("USB's training setting, shared by every semi-supervised method here (USB has no ICT; the "
                          "ICT code trains CIFAR-10 with SGD momentum 0.9, lr 0.1, weight decay 1e-4, cosine to 0 at "
                          "1.1× the epochs): SGD Nesterov momentum 0.9, lr 0.03 (no batch scaling), weight decay "
                          "5e-4, lr · cos(7πk/16K)")
    mu: int = Field(1, ge=1, description="unlabeled batch = mu × labeled batch (the ICT code: equal batches)")
    lambda_u: float = Field(100.0, ge=0, description="maximum weight of the consistency term (ICT code "
                                                     "--mixup_consistency 100 for CIFAR-10)")
    ema_m: float = Field(0.999, ge=0, lt=1, description="teacher = EMA of the student with this decay (ICT code "
                                                        "--ema_decay)")
    unsup_warmup: float = Field(0.25, ge=0, le=1, description="fraction of the steps the ramp-up lasts (ICT code: "
                                                              "--consistency_rampup_ends 100 of 400 epochs)")
    rampup: Literal["sigmoid", "linear"] = Field(
        "sigmoid", description="shape of the ramp-up: sigmoid exp(−5(1 − t)²) (the ICT code) or linear")
    mixup_alpha: float = Field(1.0, ge=0, description="λ ~ Beta(α, α) of the unlabeled interpolation; 0 = no mixing "
                                                      "(ICT code --mixup_usup_alpha 1.0 for CIFAR-10)")
    sup_mixup_alpha: float = Field(1.0, ge=0, description="mixup of the labeled batch (soft-target CE); 0 = plain "
                                                          "CE (ICT code --mixup_sup_alpha 1.0 for CIFAR-10)")
    target_mixing: Literal["logits", "probabilities"] = Field(
        "logits", description="what is mixed into the target: the teacher's logits, then softmax (the ICT code) or "
                              "its class probabilities (the paper's Mix_λ(f(u_j), f(u_k)))")


@register("ict", ICTConfig)
class ICT(MeanTeacher):
    """Interpolation consistency training: the student's prediction on a mix of two unlabeled images follows the
    mix of an EMA teacher's predictions on them (teacher, decay warm-up and ramp-up as Mean Teacher)."""

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        n = batch.x.shape[0]
        x, u = self.weak_view(batch.x), self.weak_view(batch.u)
        targets_x = F.one_hot(batch.y, self.info.num_classes).float()
        if cfg.sup_mixup_alpha > 0:  # mixup's λ' = max(λ, 1 − λ): the same distribution of mixed batches
            x, targets_x, _ = mixup(x, targets_x, cfg.sup_mixup_alpha)
        with torch.no_grad():
            logits_teacher = self.teacher(u).float()
            probs = torch.softmax(logits_teacher, dim=1)
            self.track_pseudo_labels(probs, torch.ones_like(probs[:, 0]), batch.u_y)
        lam = ict_mix_coefficient(cfg.mixup_alpha)
        order = torch.randperm(u.shape[0], device=u.device)
        logits = self.net(torch.cat([x, interpolate(u, lam, order)]))
        supervised = F.cross_entropy(logits[:n].float(), targets_x)
        consistency = ict_loss(logits[n:], logits_teacher, lam, order, cfg.target_mixing)
        weight = cfg.lambda_u * self.ramp(progress)
        return {"loss": supervised + weight * consistency, "supervised_loss": supervised.detach(),
                "unsupervised_loss": consistency.detach(), "unsup_weight": torch.tensor(weight),
                "mix_lambda": torch.tensor(lam)}
