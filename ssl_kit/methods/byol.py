"""BYOL (Grill et al. 2020): bootstrap your own latent. An online network (backbone → projector → predictor) predicts
a momentum target network's projection of the other view; no negatives. The target (backbone + projector) follows
the online one by EMA with τ rising from `momentum` (τ_base) to 1 along a half cosine; the loss is the paper's sum
over the two view orders of 2 − 2·cos(p, z_target). The online backbone is the one evaluated and saved.

Collapse is watched: the std of the normalised online projections (`byol/embedding_std`, ≈ 1/√D when healthy,
0 when collapsed) is logged per epoch with a one-time warning (methods/collapse.py)."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..config import ViewsConfig
from ..losses import byol_loss
from ..models.heads import mlp
from .base import Progress
from .collapse import EmbeddingStdWatch
from .contrastive import ContrastiveMethod
from .momentum import frozen_copy
from .pretext import PretextConfig
from .registry import register


class BYOLConfig(PretextConfig):
    """BYOL: projector and predictor MLPs (Linear-BN-ReLU-Linear), momentum target, two views (`views`; the
    second view is solarized with views.solarize_prob)."""

    method: Literal["byol"]

    recommended = {"optimizer": {"name": "lars", "lr": 0.2, "lr_scaling": "linear", "base_batch_size": 256, "weight_decay": 1.5e-6, "momentum": 0.9}, "schedule": {"name": "cosine", "warmup_epochs": 10}}
    recommended_source = ("BYOL (Grill et al. 2020, §3.3): LARS, lr 0.2 × batch/256, weight decay 1.5e-6, 10 warm-up epochs, cosine decay")
    proj_hidden_dim: int = Field(4096, ge=1, description="projector hidden width (paper: 4096)")
    proj_dim: int = Field(256, ge=1, description="projection (and prediction) dimension D (paper: 256)")
    pred_hidden_dim: int = Field(4096, ge=1, description="predictor hidden width (paper: 4096)")
    momentum: float = Field(0.99, ge=0, le=1, description="target EMA τ_base: cosine from this value to 1 "
                                                          "(paper: 0.996 on ImageNet; solo-learn CIFAR: 0.99)")
    views: ViewsConfig = Field(default_factory=ViewsConfig)


@register("byol", BYOLConfig)
class BYOL(ContrastiveMethod):
    """Online: backbone → projector → predictor; target: EMA copies of backbone and projector (no gradient)."""

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        super().__init__(cfg, backbone, info)
        self.projector = mlp(backbone.num_features, cfg.proj_hidden_dim, cfg.proj_dim, layers=2)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, layers=2)
        self.target_backbone = frozen_copy(self.backbone)
        self.target_projector = frozen_copy(self.projector)
        self.current_momentum = cfg.momentum
        self.watch = EmbeddingStdWatch("byol")

    def head_modules(self) -> list[nn.Module]:
        return [self.probe, self.projector, self.predictor]

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]

    @torch.no_grad()
    def targets(self, x: Tensor) -> Tensor:
        """Target projections (M, D) of normalised images x (M, C, H, W), no gradient."""
        return self.target_projector(self.target_backbone(x))

    def contrast(self, x1: Tensor, x2: Tensor, progress: Progress) -> tuple[Tensor, Tensor]:
        """views (N, C, H, W) × 2 -> (byol_loss(p1, t2) + byol_loss(p2, t1), backbone features (2N, F))."""
        x = torch.cat([x1, x2])
        features = self.backbone(x)
        z = self.projector(features)
        p1, p2 = self.predictor(z).chunk(2)
        t1, t2 = self.targets(x).chunk(2)
        self.watch.update(z)
        return byol_loss(p1, t2) + byol_loss(p2, t1), features

    def epoch_metrics(self) -> dict[str, float]:
        return {**super().epoch_metrics(), **self.watch.epoch_metrics(), "byol/momentum": self.current_momentum}
