"""TiCo (Zhu et al. 2022): transformation invariance and covariance contrast. An online network (backbone →
projector) embeds view 1, a momentum target (EMA copies, τ on a cosine from `momentum` to 1) embeds view 2; the loss
1 − cos(z_online, z_target) + ρ · z_onlineᵀ C z_online pulls the views together while pushing each embedding away
from the directions a running second-moment matrix C (C ← β·C + (1 − β)·B, B the batch's) says recent embeddings
occupy — a contrast against an implicit memory of all past batches, with no negatives and no predictor. C lives in
the loss's `covariance` buffer (saved with checkpoints); under torchrun B is over the global batch.

Collapse is watched: the std of the normalised online projections (`tico/embedding_std`, ≈ 1/√D healthy) is logged
per epoch with a one-time warning (methods/collapse.py)."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..config import ViewsConfig
from ..data.loader import Batch
from ..losses import TiCoLoss
from ..models.heads import mlp
from .base import Progress
from .byol import BYOLConfig
from .collapse import EmbeddingStdWatch
from .contrastive import ContrastiveMethod
from .momentum import frozen_copy
from .pretext import PretextConfig
from .registry import register


class TiCoConfig(PretextConfig):
    """TiCo. Defaults: β 0.9 and ρ 8 (paper; lightly TiCoLoss), projector Linear-BN-ReLU-Linear 4096 → 256 (the
    paper, as quoted by lightly's TiCoProjectionHead), target momentum 0.99 → 1 (lightly's ImageNet TiCo
    benchmark, BYOL's schedule). The loss is lightly's direction: online on view 1, target on view 2."""

    method: Literal["tico"]

    recommended = BYOLConfig.recommended  # TiCo follows BYOL's optimisation (below)
    recommended_source = ("TiCo (Zhu et al. 2022) follows BYOL's optimisation; lightly's ImageNet TiCo benchmark: LARS, lr 0.2 × batch/256, weight decay 1.5e-6, 10 warm-up epochs, cosine decay")
    proj_hidden_dim: int = Field(4096, ge=1, description="projector hidden width (paper, lightly: 4096)")
    proj_dim: int = Field(256, ge=1, description="embedding dimension D (paper, lightly: 256)")
    beta: float = Field(0.9, ge=0, le=1, description="β: EMA coefficient of the covariance C (paper, lightly: 0.9)")
    rho: float = Field(8.0, ge=0, description="ρ: weight of the covariance contrast term (paper, lightly: 8)")
    momentum: float = Field(0.99, ge=0, le=1, description="target EMA τ_base: cosine from this value to 1 "
                                                          "(lightly's ImageNet benchmark: 0.99)")
    views: ViewsConfig = Field(default_factory=ViewsConfig)


@register("tico", TiCoConfig)
class TiCo(ContrastiveMethod):
    """TiCo: online backbone → projector on view 1 against an EMA target on view 2; 1 − cos + ρ·zᵀCz with a running
    second-moment matrix C (TiCoLoss), no negatives, no predictor."""

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        super().__init__(cfg, backbone, info)
        self.projector = mlp(backbone.num_features, cfg.proj_hidden_dim, cfg.proj_dim, layers=2)
        self.target_backbone = frozen_copy(self.backbone)
        self.target_projector = frozen_copy(self.projector)
        self.current_momentum = cfg.momentum
        self.loss_fn = TiCoLoss(cfg.proj_dim, cfg.beta, cfg.rho)
        self.watch = EmbeddingStdWatch("tico")

    def head_modules(self) -> list[nn.Module]:
        return [self.probe, self.projector]

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        x1, x2 = self.augment_views(batch)
        loss, features = self.contrast(x1, x2, progress)
        return self.with_probe("contrastive_loss", loss, features, batch.y)

    def contrast(self, x1: Tensor, x2: Tensor, progress: Progress) -> tuple[Tensor, Tensor]:
        """views (N, C, H, W) × 2 -> (TiCo loss of online(x1) against target(x2), online features (N, F))."""
        features = self.backbone(x1)
        z = self.projector(features)
        with torch.no_grad():
            target = self.target_projector(self.target_backbone(x2))
        self.watch.update(z)
        return self.loss_fn(z, target), features

    def epoch_metrics(self) -> dict[str, float]:
        return {**super().epoch_metrics(), **self.watch.epoch_metrics(), "tico/momentum": self.current_momentum}
