"""MixMatch (Berthelot et al. 2019), as USB runs it (`mixmatch`): K weak views of each unlabeled image are
classified without gradient, their mean prediction is sharpened with T (`mixmatch_targets`); labeled images
(one-hot targets) and the K unlabeled views (the guess as target) are mixed with a random partner from the whole set,
λ' = max(λ, 1 − λ), λ ~ Beta(α, α) (`mixup`); soft cross-entropy on the labeled rows, squared error on the unlabeled
rows (`mixmatch_loss`), weighted by λ_u times a linear ramp-up. BatchNorm running statistics are left untouched by
the label-guessing pass (USB's freeze_bn); the mixed batch goes through the network in one pass."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..data.loader import Batch
from ..losses import linear_rampup, mixmatch_loss, mixmatch_targets, mixup
from .base import Progress
from .registry import register
from .semi import USB_SGD, SemiSupervisedConfig, SemiSupervisedMethod


class MixMatchConfig(SemiSupervisedConfig):
    method: Literal["mixmatch"]

    recommended = USB_SGD
    recommended_source = ("USB's MixMatch config (the paper used Adam lr 0.002; USB trains every algorithm with this SGD): SGD Nesterov momentum 0.9, lr 0.03 (no batch scaling), weight decay 5e-4, lr · cos(7πk/16K)")
    mu: int = Field(1, ge=1, description="unlabeled batch = mu × labeled batch (USB uratio 1)")
    lambda_u: float = Field(100.0, ge=0, description="weight of the squared-error term (USB ulb_loss_ratio; its "
                                                     "CIFAR-10 configs use 75)")
    temperature: float = Field(0.5, gt=0, description="sharpening of the averaged guess (USB T)")
    mixup_alpha: float = Field(0.5, ge=0, description="Beta(α, α) of the mixup coefficient; 0 = no mixing (USB "
                                                      "mixup_alpha)")
    num_augmentations: int = Field(2, ge=1, description="K weak views per unlabeled image (USB: 2)")
    unsup_warmup: float = Field(1 / 64, ge=0, le=1, description="fraction of the steps over which λ_u ramps up "
                                                                "linearly (USB unsup_warm_up; its configs use 0.4)")


@contextmanager
def frozen_bn_statistics(module: nn.Module):
    """Run `module` in training mode (batch statistics) while leaving every BatchNorm running mean/var and counter
    as they were (USB's bn_controller.freeze_bn/unfreeze_bn)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
             for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for current, old in zip([b for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                                         if b is not None], buffers):
                    current.copy_(old)


@register("mixmatch", MixMatchConfig)
class MixMatch(SemiSupervisedMethod):
    """MixMatch: K weak guesses averaged and sharpened, MixUp of labeled and unlabeled images, soft CE on the labeled
    rows and squared error on the unlabeled ones."""

    @torch.no_grad()
    def guess(self, u_views: list[Tensor]) -> tuple[Tensor, Tensor]:
        """K normalised views (each (U, C, H, W)) -> (mean prediction (U, K_cls), sharpened guess (U, K_cls))."""
        with frozen_bn_statistics(self.net):  # one pass per view, as USB: BN statistics of that view alone
            per_view = torch.stack([torch.softmax(self.net(view).float(), dim=1) for view in u_views])
        return per_view.mean(dim=0), mixmatch_targets(per_view, self.cfg.temperature)

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        n = batch.x.shape[0]
        x = self.weak_view(batch.x)
        u_views = [self.weak_view(batch.u) for _ in range(cfg.num_augmentations)]
        mean_probs, guess = self.guess(u_views)
        self.track_pseudo_labels(mean_probs, torch.ones_like(mean_probs[:, 0]), batch.u_y)
        targets = torch.cat([F.one_hot(batch.y, self.info.num_classes).float(), guess.repeat(len(u_views), 1)])
        mixed_x, mixed_targets, lam = mixup(torch.cat([x, *u_views]), targets, cfg.mixup_alpha)
        logits = self.net(mixed_x)
        supervised, unsupervised = mixmatch_loss(logits[:n], mixed_targets[:n], logits[n:], mixed_targets[n:])
        weight = cfg.lambda_u * linear_rampup(progress.step, cfg.unsup_warmup * progress.total_steps)
        return {"loss": supervised + weight * unsupervised, "supervised_loss": supervised.detach(),
                "unsupervised_loss": unsupervised.detach(), "unsup_weight": torch.tensor(weight),
                "mixup_lambda": torch.tensor(lam)}
