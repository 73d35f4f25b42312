"""Π-model (Laine & Aila 2017), as USB runs it (`pimodel`): two independent weak augmentations of each unlabeled
image; the class probabilities on the second are pulled towards those on the first (squared error averaged over
classes and samples, no gradient through the first: `mean_teacher_loss`, USB's `consistency_loss(..., 'mse')`),
weighted by λ_u times a ramp-up over the first `unsup_warmup` of training (linear as USB, or the paper's sigmoid).
As in USB, only the labeled pass updates the BatchNorm running statistics; the two unlabeled passes use their own
batch statistics and leave the running ones untouched (`batch_statistics_only`)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..data.loader import Batch
from ..losses import linear_rampup, mean_teacher_loss, sigmoid_rampup
from .base import Progress
from .registry import register
from .semi import USB_SGD, SemiSupervisedConfig, SemiSupervisedMethod
from .vat import batch_statistics_only


class PiModelConfig(SemiSupervisedConfig):
    """Π-model: λ_u · ramp · MSE(softmax(view 2), softmax(view 1)) + CE on the labeled batch."""

    method: Literal["pi_model"]

    recommended = USB_SGD
    recommended_source = ("USB's Π-model config (config/classic_cv/pimodel/pimodel_cifar10_40_0.yaml): SGD Nesterov "
                          "momentum 0.9, lr 0.03 (no batch scaling), weight decay 5e-4, lr · cos(7πk/16K)")
    mu: int = Field(1, ge=1, description="unlabeled batch = mu × labeled batch (USB uratio 1)")
    lambda_u: float = Field(10.0, ge=0, description="weight of the consistency term (USB ulb_loss_ratio 10)")
    unsup_warmup: float = Field(0.4, ge=0, le=1, description="fraction of the steps over which the consistency "
                                                             "weight ramps up from 0 to lambda_u (USB unsup_warm_up)")
    rampup: Literal["linear", "sigmoid"] = Field(
        "linear", description="shape of the ramp-up: linear (USB) or exp(−5(1 − t)²) (Laine & Aila)")


@register("pi_model", PiModelConfig)
class PiModel(SemiSupervisedMethod):
    """Π-model: squared error between the class probabilities on two weak views of each unlabeled image (the first
    as the target, without gradient), ramped up."""

    def ramp(self, progress: Progress) -> float:
        """The ramp-up factor in [0, 1] after `progress.step` steps (0 at step 0, 1 from unsup_warmup · total)."""
        length = self.cfg.unsup_warmup * progress.total_steps
        return (sigmoid_rampup if self.cfg.rampup == "sigmoid" else linear_rampup)(progress.step, length)

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        logits_x = self.net(self.weak_view(batch.x))
        with batch_statistics_only(self.net):  # USB: BN running statistics from the labeled batch only
            logits_first = self.net(self.weak_view(batch.u))
            logits_second = self.net(self.weak_view(batch.u))
        with torch.no_grad():
            probs = torch.softmax(logits_first.detach().float(), dim=1)
            self.track_pseudo_labels(probs, torch.ones_like(probs[:, 0]), batch.u_y)
        supervised = F.cross_entropy(logits_x.float(), batch.y)
        consistency = mean_teacher_loss(logits_second, logits_first)  # target: the first view, detached
        weight = cfg.lambda_u * self.ramp(progress)
        return {"loss": supervised + weight * consistency, "supervised_loss": supervised.detach(),
                "unsupervised_loss": consistency.detach(), "unsup_weight": torch.tensor(weight)}
