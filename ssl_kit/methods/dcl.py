"""DCL (Yeh et al. 2022): decoupled contrastive learning. SimCLR's architecture (two views, backbone, 2-layer MLP
projector) with the positive pair taken out of the InfoNCE denominator, which removes the coupling between the
positive and the negatives that makes NT-Xent need large batches. `weighting: vmf` is DCLW: each positive term is
weighted by 2 − N·softmax(cos/σ) over the batch (harder positives count more). Under torchrun the negatives and the
DCLW weights span the global batch (`DCLLoss` all-gathers the projections with gradients)."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..config import ViewsConfig
from ..losses import DCLLoss
from ..models.heads import mlp
from .base import Progress
from .contrastive import ContrastiveMethod
from .pretext import PretextConfig
from .registry import register


class DCLConfig(PretextConfig):
    """DCL / DCLW. Defaults: temperature 0.1 (lightly DCLLoss default and its ImageNet DCL benchmark), σ 0.5 (lightly
    DCLWLoss, after the reference implementation raminnakhli/Decoupled-Contrastive-Learning); projector
    Linear-BN-ReLU-Linear 2048 → 128 (SimCLR's head, which DCL keeps; lightly SimCLRProjectionHead)."""

    method: Literal["dcl"]

    recommended = {"optimizer": {"name": "lars", "lr": 1.2, "lr_scaling": "sqrt", "base_batch_size": 256, "weight_decay": 1e-6, "momentum": 0.9}, "schedule": {"name": "cosine", "warmup_epochs": 10}}
    recommended_source = ("DCL (Yeh et al. 2022) trains with SimCLR's recipe; lightly's ImageNet DCL/DCLW benchmark: LARS, lr 0.075·√batch (= 1.2 × √(batch/256), SimCLR appendix B.1 square-root scaling), weight decay 1e-6, 10 warm-up epochs, cosine decay")
    temperature: float = Field(0.1, gt=0, description="τ dividing the cosine similarities (lightly: 0.1)")
    weighting: Literal["none", "vmf"] = Field(
        "none", description="none: DCL; vmf: DCLW, positives weighted by 2 − N·softmax(cos/σ) (no gradient)")
    sigma: float = Field(0.5, gt=0, description="σ of DCLW's von Mises-Fisher weights (lightly, reference code: 0.5)")
    proj_hidden_dim: int = Field(2048, ge=1, description="projector hidden width (SimCLR/lightly head: 2048)")
    proj_dim: int = Field(128, ge=1, description="projection dimension (SimCLR/lightly head: 128)")
    views: ViewsConfig = Field(default_factory=ViewsConfig)


@register("dcl", DCLConfig)
class DCL(ContrastiveMethod):
    """DCL (DCLW with weighting: vmf): backbone on both views → 2-layer projector → NT-Xent without the positive in
    its denominator (DCLLoss), over the global batch."""

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        super().__init__(cfg, backbone, info)
        self.projector = mlp(backbone.num_features, cfg.proj_hidden_dim, cfg.proj_dim, layers=2)
        self.loss_fn = DCLLoss(cfg.temperature, cfg.weighting, cfg.sigma)

    def head_modules(self) -> list[nn.Module]:
        return [self.probe, self.projector]

    def contrast(self, x1: Tensor, x2: Tensor, progress: Progress) -> tuple[Tensor, Tensor]:
        """views (N, C, H, W) × 2 -> (DCL loss, backbone features (2N, F))."""
        features = self.backbone(torch.cat([x1, x2]))
        z1, z2 = self.projector(features).chunk(2)
        return self.loss_fn(z1, z2), features
