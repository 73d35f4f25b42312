"""SimSiam (Chen & He 2021): a siamese network with a predictor and a stop-gradient, no negatives, no momentum
encoder. Each view's prediction p regresses the other view's projection z, which is detached (the stop-gradient
without which the method collapses):

    loss = ½·D(p1, sg(z2)) + ½·D(p2, sg(z1)),  D(p, z) = −cos(p, z)  ∈ [−1, 1]

computed from `symmetric_byol_loss` (2 − 2·cos) as (that − 2) / 2, so values and gradients are the paper's.
As in the paper (§4.2: a predictor lr without decay works slightly better) the predictor trains at the constant base lr
(`fixed_predictor_lr`, default on: its own param group with ParamGroup.fixed_lr, so neither warmup nor cosine decay
touches it) while backbone and projector follow the schedule; off, the predictor follows the schedule too.

Collapse is watched as the paper does: the std of the normalised projections (`simsiam/embedding_std`, ≈ 1/√D
healthy, 0 collapsed) is logged per epoch with a one-time warning (methods/collapse.py)."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..config import ViewsConfig
from ..losses import symmetric_byol_loss
from ..models.heads import mlp
from .base import Progress
from .collapse import EmbeddingStdWatch
from .contrastive import ContrastiveMethod
from .param_groups import ParamGroup, split_off
from .pretext import PretextConfig
from .registry import register


class SimSiamConfig(PretextConfig):
    """SimSiam: 3-layer projector with BN on every layer (output BN without affine), 2-layer bottleneck predictor."""

    method: Literal["simsiam"]

    recommended = {"optimizer": {"name": "sgd", "lr": 0.05, "lr_scaling": "linear", "base_batch_size": 256, "weight_decay": 0.0001, "momentum": 0.9}, "schedule": {"name": "cosine", "warmup_epochs": 0}}
    recommended_source = ("SimSiam (Chen & He 2021, §4): SGD momentum 0.9, lr 0.05 × batch/256, weight decay 1e-4, cosine decay, no warm-up")
    proj_hidden_dim: int = Field(2048, ge=1, description="projector hidden width (paper: 2048)")
    proj_dim: int = Field(2048, ge=1, description="projection dimension D (paper: 2048)")
    pred_hidden_dim: int = Field(512, ge=1, description="predictor bottleneck width (paper: 512)")
    fixed_predictor_lr: bool = Field(True, description="the predictor keeps the base lr (× lr scaling) on every step, "
                                                       "no warmup or decay, as the paper; false: it follows the "
                                                       "schedule like the projector")
    views: ViewsConfig = Field(default_factory=ViewsConfig)


def simsiam_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """½·[−cos(p1, sg(z2))] + ½·[−cos(p2, sg(z1))] averaged over the batch. p*, z*: (N, D). -> scalar in [−1, 1]."""
    return 0.5 * symmetric_byol_loss(p1, p2, z1.detach(), z2.detach()) - 1.0


@register("simsiam", SimSiamConfig)
class SimSiam(ContrastiveMethod):
    """backbone → projector → predictor on both views; the loss stops the gradient at each view's projection."""

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        super().__init__(cfg, backbone, info)
        self.projector = mlp(backbone.num_features, cfg.proj_hidden_dim, cfg.proj_dim, layers=3, last_bn=True)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, layers=2)
        self.watch = EmbeddingStdWatch("simsiam")

    def head_modules(self) -> list[nn.Module]:
        return [self.probe, self.projector, self.predictor]

    def parameter_groups(self) -> list[ParamGroup]:
        """Backbone, projector, probe; with fixed_predictor_lr the predictor in its own fixed-lr group."""
        groups = super().parameter_groups()
        if not self.cfg.fixed_predictor_lr:
            return groups
        return split_off(groups, ParamGroup("predictor", list(self.predictor.parameters()), fixed_lr=True))

    def contrast(self, x1: Tensor, x2: Tensor, progress: Progress) -> tuple[Tensor, Tensor]:
        """views (N, C, H, W) × 2 -> (SimSiam loss, backbone features (2N, F))."""
        features = self.backbone(torch.cat([x1, x2]))
        z = self.projector(features)
        p1, p2 = self.predictor(z).chunk(2)
        z1, z2 = z.chunk(2)
        self.watch.update(z)
        return simsiam_loss(p1, p2, z1, z2), features

    def epoch_metrics(self) -> dict[str, float]:
        return {**super().epoch_metrics(), **self.watch.epoch_metrics()}
