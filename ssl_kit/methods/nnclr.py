"""NNCLR (Dwibedi et al. 2021): contrast each view's nearest neighbour in a support set of earlier embeddings with
the other view's prediction. Projector (3 layers, BN) and predictor (2 layers); the support set is a FIFO queue of
L2-normalised projections of the first view, refreshed with every step's embeddings after the loss (as the paper
and solo-learn); under torchrun it is filled with every rank's embeddings and the negatives are gathered too."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..losses import NNCLRLoss, SupportSet
from ..models.heads import mlp
from .base import Progress
from .contrastive import ContrastiveConfig, ContrastiveMethod
from .registry import register


class NNCLRConfig(ContrastiveConfig):
    """NNCLR with the paper's defaults (τ 0.1, support set 98304, projector 2048 → 256, predictor hidden 4096)."""

    method: Literal["nnclr"]

    recommended = {"optimizer": {"name": "lars", "lr": 0.3, "lr_scaling": "linear", "base_batch_size": 256, "weight_decay": 1e-6, "momentum": 0.9}, "schedule": {"name": "cosine", "warmup_epochs": 10}}
    recommended_source = ("NNCLR (Dwibedi et al. 2021) trains as SimCLR does: LARS, lr 0.3 × batch/256, weight decay 1e-6, 10 warm-up epochs, cosine")
    temperature: float = Field(0.1, gt=0, description="softmax temperature of the nearest-neighbour InfoNCE")
    proj_hidden_dim: int = Field(2048, ge=1)
    proj_dim: int = Field(256, ge=1)
    pred_hidden_dim: int = Field(4096, ge=1, description="predictor hidden width")
    support_set_size: int = Field(98304, ge=1, description="support set (queue) of earlier projections; the paper's "
                                                           "98304, a few thousand for small sets like digits")


@register("nnclr", NNCLRConfig)
class NNCLR(ContrastiveMethod):
    """backbone -> projector z -> predictor p; loss ½[CE(NN(z1)·p2ᵀ/τ) + CE(NN(z2)·p1ᵀ/τ)], then the support set
    takes z1."""

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        super().__init__(cfg, backbone, info)
        self.projector = mlp(backbone.num_features, cfg.proj_hidden_dim, cfg.proj_dim, layers=3, last_bn=True)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, layers=2)
        self.support = SupportSet(cfg.support_set_size, cfg.proj_dim)
        self.loss_fn = NNCLRLoss(cfg.temperature)

    def head_modules(self) -> list[nn.Module]:
        return [self.probe, self.projector, self.predictor]

    def contrast(self, x1: Tensor, x2: Tensor, progress: Progress) -> tuple[Tensor, Tensor]:
        features = self.backbone(torch.cat([x1, x2]))
        z = self.projector(features)
        p1, p2 = self.predictor(z).chunk(2)
        z1, z2 = z.chunk(2)
        loss = self.loss_fn(z1, z2, self.support, p1, p2)
        self.support.update(z1.detach())
        return loss, features
