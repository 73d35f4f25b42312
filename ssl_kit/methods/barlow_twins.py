"""Barlow Twins (Zbontar et al. 2021): redundancy reduction. The cross-correlation matrix of the two views'
batch-standardised projections is pushed to the identity: Σ_i (1 − c_ii)² + λ·Σ_{i≠j} c_ij², times `scale_loss`.
No predictor, no momentum, no negatives; the statistics are over the global batch under torchrun
(`BarlowTwinsLoss` all-reduces them, as the paper does).

Collapse is watched: the std of the normalised projections (`barlow_twins/embedding_std`, ≈ 1/√D healthy) is
logged per epoch with a one-time warning (methods/collapse.py)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from ..config import ViewsConfig
from ..losses import BarlowTwinsLoss
from .contrastive import ProjectedPairMethod
from .pretext import PretextConfig
from .registry import register


class BarlowTwinsConfig(PretextConfig):
    """Barlow Twins: 3-layer projector (Linear-BN-ReLU × 2, Linear), λ weighting the off-diagonal terms."""

    method: Literal["barlow_twins"]

    recommended = {"optimizer": {"name": "lars", "lr": 0.2, "lr_scaling": "linear", "base_batch_size": 256, "weight_decay": 1.5e-6, "momentum": 0.9}, "schedule": {"name": "cosine", "warmup_epochs": 10}}
    recommended_source = ("Barlow Twins (Zbontar et al. 2021, §B): LARS, lr 0.2 × batch/256 for the weights, weight decay 1.5e-6, 10 warm-up epochs, cosine decay")
    proj_hidden_dim: int = Field(2048, ge=1, description="projector hidden width (paper: 8192; solo-learn CIFAR 2048)")
    proj_dim: int = Field(2048, ge=1, description="projection dimension D (paper: 8192; solo-learn CIFAR 2048)")
    lambda_offdiag: float = Field(5e-3, ge=0, description="λ: weight of the off-diagonal (redundancy) terms")
    scale_loss: float = Field(1.0, gt=0, description="the loss is multiplied by this (solo-learn CIFAR: 0.1)")
    views: ViewsConfig = Field(default_factory=ViewsConfig)


@register("barlow_twins", BarlowTwinsConfig)
class BarlowTwins(ProjectedPairMethod):
    """backbone → projector on both views → scale_loss · BarlowTwinsLoss(z1, z2) over the global batch."""

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        super().__init__(cfg, backbone, info)
        self.loss_fn = BarlowTwinsLoss(cfg.lambda_offdiag)

    def pair_loss(self, z1: Tensor, z2: Tensor) -> Tensor:
        return self.cfg.scale_loss * self.loss_fn(z1, z2)
