"""MMCR (Yerxa et al. 2023): maximum manifold capacity representations. Each image is seen in `n_views` augmented
views; their L2-normalised projections are averaged into a per-image centroid, and the loss is minus the nuclear
norm of the batch's (N, D) centroid matrix (+ `lambda_local` × the mean nuclear norm of each image's own views).
Maximising it spreads the centroids of different images over many directions while each image's views agree (a
mean of unit vectors is long only when they align). With `momentum_encoder` (the reference's ImageNet setting, and
lightly's example) an EMA copy of backbone + projector embeds the same views too and its embeddings join each
centroid (no gradient). Under torchrun the centroids span the global batch (`MMCRLoss` all-gathers them).

Collapse is watched: the std of the normalised online projections (`mmcr/embedding_std`, ≈ 1/√D healthy) is logged
per epoch with a one-time warning (methods/collapse.py)."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..config import ViewsConfig
from ..data.loader import Batch
from ..data.views import ContrastiveView
from ..losses import MMCRLoss
from ..models.heads import mlp
from .base import Progress
from .collapse import EmbeddingStdWatch
from .momentum import frozen_copy
from .pretext import PretextConfig, PretextMethod
from .registry import register


class MMCRConfig(PretextConfig):
    """MMCR. Defaults from the reference implementation (ThomasYerxa/mmcr, ImageNet train script): 8 views per
    image, λ = 0, momentum encoder with τ 0.99; projector Linear-BN-ReLU × 2 then Linear (the reference's
    8192-8192-512; here lightly's CIFAR example widths 512-512-128, since digits-scale backbones are small)."""

    method: Literal["mmcr"]

    recommended = {"optimizer": {"name": "lars", "lr": 0.8, "lr_scaling": "linear", "base_batch_size": 256, "weight_decay": 1e-6, "momentum": 0.9}, "schedule": {"name": "cosine", "warmup_epochs": 10}}
    recommended_source = ("MMCR reference implementation (Yerxa et al. 2023, ThomasYerxa/mmcr imagenet/train.py): LARS, lr 0.8 × batch/256, weight decay 1e-6, 10 warm-up epochs, cosine decay")
    n_views: int = Field(8, ge=2, description="augmented views per image, K (reference ImageNet and lightly "
                                              "MMCRTransform: 8)")
    lambda_local: float = Field(0.0, ge=0, description="λ: weight of the mean nuclear norm of each image's views "
                                                       "(reference script: 0; lightly MMCRLoss: 5e-3)")
    momentum_encoder: bool = Field(True, description="embed the views with an EMA target too and average its "
                                                     "embeddings into the centroids (reference ImageNet, lightly)")
    momentum: float = Field(0.99, ge=0, le=1, description="target EMA τ_base: cosine from this value to 1 "
                                                          "(reference: 0.99)")
    proj_hidden_dim: int = Field(512, ge=1, description="projector hidden width (reference: 8192; lightly CIFAR "
                                                        "example: 512)")
    proj_dim: int = Field(128, ge=1, description="embedding dimension D (reference: 512; lightly CIFAR example: 128)")
    views: ViewsConfig = Field(default_factory=ViewsConfig)


@register("mmcr", MMCRConfig)
class MMCR(PretextMethod):
    """MMCR: K views per image → backbone → 3-layer projector; minus the nuclear norm of the per-image centroids of the
    normalised embeddings (MMCRLoss; an EMA target's embeddings join the centroids when momentum_encoder)."""

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        super().__init__(cfg, backbone, info)
        self.views = nn.ModuleList(ContrastiveView.from_config(self.normalize, cfg.views, cfg.data.hflip)
                                   for _ in range(cfg.n_views))
        self.projector = mlp(backbone.num_features, cfg.proj_hidden_dim, cfg.proj_dim, layers=3)
        if cfg.momentum_encoder:
            self.target_backbone = frozen_copy(self.backbone)
            self.target_projector = frozen_copy(self.projector)
        self.current_momentum = cfg.momentum
        self.loss_fn = MMCRLoss(cfg.lambda_local)
        self.watch = EmbeddingStdWatch("mmcr")

    def view_list(self) -> list[nn.Module]:
        return list(self.views)

    def head_modules(self) -> list[nn.Module]:
        return [self.probe, self.projector]

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        if not self.cfg.momentum_encoder:
            return []
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]

    @staticmethod
    def per_image(z: Tensor, k: int) -> Tensor:
        """(K·N, D) embeddings, view-major (all images' view 0, then view 1, ...) -> (N, K, D)."""
        return z.view(k, -1, z.shape[-1]).transpose(0, 1)

    def embed(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """x (K·N, C, H, W) view-major -> (embeddings (N, K, D) or (N, 2K, D) with the target's, online features
        (K·N, F)). The target's half carries no gradient."""
        features = self.backbone(x)
        z = self.projector(features)
        self.watch.update(z)
        z = self.per_image(z, k)
        if self.cfg.momentum_encoder:
            with torch.no_grad():
                target = self.per_image(self.target_projector(self.target_backbone(x)), k)
            z = torch.cat([z, target], dim=1)
        return z, features

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        views = self.augment_views(batch)
        z, features = self.embed(torch.cat(views), len(views))
        return self.with_probe("mmcr_loss", self.loss_fn(z), features, batch.y.repeat(len(views)))

    def epoch_metrics(self) -> dict[str, float]:
        metrics = {**super().epoch_metrics(), **self.watch.epoch_metrics()}
        if self.cfg.momentum_encoder:
            metrics["mmcr/momentum"] = self.current_momentum
        return metrics
