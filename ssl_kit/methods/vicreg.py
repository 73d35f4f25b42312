"""VICReg (Bardes et al. 2022): variance-invariance-covariance regularisation. The two views' projections are pulled
together (invariance: MSE), each dimension's std over the batch is held above 1 (variance hinge), and the
dimensions are decorrelated (covariance); weights `sim_weight` / `var_weight` / `cov_weight` (paper: 25 / 25 / 1).
No predictor, no momentum, no negatives; variance and covariance are over the global batch under torchrun
(`VICRegLoss` all-gathers the projections, as the reference does).

Collapse is watched: the std of the normalised projections (`vicreg/embedding_std`, ≈ 1/√D healthy) is logged per
epoch with a one-time warning (methods/collapse.py)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from ..config import ViewsConfig
from ..losses import VICRegLoss
from .contrastive import ProjectedPairMethod
from .pretext import PretextConfig
from .registry import register


class VICRegConfig(PretextConfig):
    """VICReg: 3-layer expander (Linear-BN-ReLU × 2, Linear) and the three loss weights."""

    method: Literal["vicreg"]

    recommended = {"optimizer": {"name": "lars", "lr": 0.2, "lr_scaling": "linear", "base_batch_size": 256, "weight_decay": 1e-6, "momentum": 0.9}, "schedule": {"name": "cosine", "warmup_epochs": 10}}
    recommended_source = ("VICReg (Bardes et al. 2022, appendix C): LARS, base lr 0.2 × batch/256, weight decay 1e-6, 10 warm-up epochs, cosine decay")
    proj_hidden_dim: int = Field(2048, ge=1, description="expander hidden width (paper: 8192; solo-learn CIFAR 2048)")
    proj_dim: int = Field(2048, ge=1, description="embedding dimension D (paper: 8192; solo-learn CIFAR 2048)")
    sim_weight: float = Field(25.0, ge=0, description="λ: weight of the invariance (MSE) term")
    var_weight: float = Field(25.0, ge=0, description="μ: weight of the variance hinge (std ≥ 1 per dimension)")
    cov_weight: float = Field(1.0, ge=0, description="ν: weight of the off-diagonal covariance term")
    eps: float = Field(1e-4, gt=0, description="added to the variance before the square root")
    views: ViewsConfig = Field(default_factory=ViewsConfig)


@register("vicreg", VICRegConfig)
class VICReg(ProjectedPairMethod):
    """backbone → expander on both views → VICRegLoss(z1, z2) (variance/covariance over the global batch)."""

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        super().__init__(cfg, backbone, info)
        self.loss_fn = VICRegLoss(cfg.sim_weight, cfg.var_weight, cfg.cov_weight, cfg.eps)

    def pair_loss(self, z1: Tensor, z2: Tensor) -> Tensor:
        return self.loss_fn(z1, z2)
