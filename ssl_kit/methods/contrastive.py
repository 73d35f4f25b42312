"""Contrastive pretext tasks: SimCLR, MoCo v2 (queue of negatives), MoCo v3 (predictor, in-batch negatives).
All three share the view pipeline and an online linear probe on detached features (how users watch progress)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..common import distributed as dist
from ..config import ViewsConfig
from ..data.views import ContrastiveView
from ..data.loader import Batch
from ..losses import InfoNCELoss, NTXentLoss
from ..models.heads import mlp
from .base import Progress
from .collapse import EmbeddingStdWatch
from .momentum import frozen_copy
from .pretext import PretextConfig, PretextMethod
from .registry import register


class ContrastiveConfig(PretextConfig):
    """Two views per image, a projector, a temperature-scaled contrastive loss."""

    temperature: float = Field(0.1, gt=0, description="softmax temperature of the contrastive loss")
    proj_hidden_dim: int = Field(512, ge=1)
    proj_dim: int = Field(128, ge=1)
    views: ViewsConfig = Field(default_factory=ViewsConfig)


class SimCLRConfig(ContrastiveConfig):
    method: Literal["simclr"]

    recommended = {"optimizer": {"name": "lars", "lr": 0.3, "lr_scaling": "linear", "base_batch_size": 256, "weight_decay": 1e-6, "momentum": 0.9}, "schedule": {"name": "cosine", "warmup_epochs": 10}}
    recommended_source = ("SimCLR (Chen et al. 2020, appendix B.1): LARS, lr 0.3 × batch/256, weight decay 1e-6, 10 warm-up epochs, cosine decay")
    forward_views: Literal["joint", "separate"] = Field(
        "joint", description="joint: one backbone forward of the 2N views (BatchNorm statistics over both views, as "
                             "SimCLR's reference); separate: one forward per view of N (BN statistics per view, as "
                             "lightly/solo-learn do); the loss is the same NT-Xent over the 2N embeddings")


class MoCoV2Config(ContrastiveConfig):
    method: Literal["mocov2"]

    recommended = {"optimizer": {"name": "sgd", "lr": 0.03, "lr_scaling": "linear", "base_batch_size": 256, "weight_decay": 0.0001, "momentum": 0.9}, "schedule": {"name": "cosine", "warmup_epochs": 0}}
    recommended_source = ("MoCo v2 (Chen et al. 2020) reference main_moco.py: SGD momentum 0.9, lr 0.03 at batch 256 (scaled linearly), weight decay 1e-4, cosine (--cos), no warm-up")
    queue_size: int = Field(4096, ge=0, description="negatives queue (0: in-batch negatives)")
    momentum: float = Field(0.99, ge=0, le=1, description="momentum encoder: base value of the cosine 0.99→1 schedule")


class MoCoV3Config(ContrastiveConfig):
    method: Literal["mocov3"]

    recommended = {"optimizer": {"name": "lars", "lr": 0.6, "lr_scaling": "linear", "base_batch_size": 256, "weight_decay": 1e-6, "momentum": 0.9}, "schedule": {"name": "cosine", "warmup_epochs": 10}}
    recommended_source = ("MoCo v3 (Chen et al. 2021) reference main_moco.py for ResNets: LARS, lr 0.6 × batch/256, weight decay 1e-6, 10 warm-up epochs, cosine (its ViT setting is AdamW lr 1.5e-4 × batch/256, weight decay 0.1)")
    pred_hidden_dim: int = Field(512, ge=1, description="predictor hidden width")
    momentum: float = Field(0.99, ge=0, le=1, description="momentum encoder: base value of the cosine 0.99→1 schedule")


class ContrastiveMethod(PretextMethod):
    """Two augmented views of each image and a projector; subclasses define `contrast`."""

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        super().__init__(cfg, backbone, info)
        self.view1 = ContrastiveView.from_config(self.normalize, cfg.views, cfg.data.hflip)
        self.view2 = ContrastiveView.from_config(self.normalize, cfg.views, cfg.data.hflip,
                                                 solarize_prob=cfg.views.solarize_prob)

    def view_list(self) -> list[nn.Module]:
        return [self.view1, self.view2]

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        x1, x2 = self.augment_views(batch)
        loss, features = self.contrast(x1, x2, progress)
        return self.with_probe("contrastive_loss", loss, features, batch.y.repeat(2))

    def contrast(self, x1: Tensor, x2: Tensor, progress: Progress) -> tuple[Tensor, Tensor]:
        """views (N, C, H, W) × 2 -> (contrastive loss, backbone features (2N, F) for the probe)."""
        raise NotImplementedError


class ProjectedPairMethod(ContrastiveMethod):
    """Two views → a 3-layer projector → `pair_loss(z1, z2)` (Barlow Twins, VICReg); the std of the projections is
    watched for collapse (`<method>/embedding_std`, methods/collapse.py). Configs give proj_hidden_dim, proj_dim."""

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        super().__init__(cfg, backbone, info)
        self.projector = mlp(backbone.num_features, cfg.proj_hidden_dim, cfg.proj_dim, layers=3)
        self.watch = EmbeddingStdWatch(self.name)

    def head_modules(self) -> list[nn.Module]:
        return [self.probe, self.projector]

    def pair_loss(self, z1: Tensor, z2: Tensor) -> Tensor:
        """projections (N, D) of view 1 and view 2 -> scalar loss."""
        raise NotImplementedError

    def contrast(self, x1: Tensor, x2: Tensor, progress: Progress) -> tuple[Tensor, Tensor]:
        """views (N, C, H, W) × 2 -> (pair loss, backbone features (2N, F))."""
        features = self.backbone(torch.cat([x1, x2]))
        z = self.projector(features)
        self.watch.update(z)
        return self.pair_loss(*z.chunk(2)), features

    def epoch_metrics(self) -> dict[str, float]:
        return {**super().epoch_metrics(), **self.watch.epoch_metrics()}


@register("simclr", SimCLRConfig)
class SimCLR(ContrastiveMethod):
    """SimCLR: backbone -> 2-layer MLP projector -> NT-Xent over the 2N views of the (global) batch."""

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        super().__init__(cfg, backbone, info)
        self.projector = mlp(backbone.num_features, cfg.proj_hidden_dim, cfg.proj_dim, layers=2)
        self.loss_fn = NTXentLoss(cfg.temperature)

    def head_modules(self) -> list[nn.Module]:
        return [self.probe, self.projector]

    def contrast(self, x1: Tensor, x2: Tensor, progress: Progress) -> tuple[Tensor, Tensor]:
        if self.cfg.forward_views == "separate":
            features = torch.cat([self.backbone(x1), self.backbone(x2)])
            z1, z2 = self.projector(features[:x1.shape[0]]), self.projector(features[x1.shape[0]:])
        else:
            features = self.backbone(torch.cat([x1, x2]))
            z1, z2 = self.projector(features).chunk(2)
        return self.loss_fn(z1, z2), features


class _MomentumMethod(ContrastiveMethod):
    """A momentum (key) encoder: copies of backbone + projector updated as m·key + (1 − m)·query, with m following
    a cosine ramp from cfg.momentum to 1 over training (the base class updates `momentum_pairs`)."""

    def _make_momentum_encoder(self) -> None:
        self.key_backbone = frozen_copy(self.backbone)
        self.key_projector = frozen_copy(self.projector)
        self.current_momentum = self.cfg.momentum

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.key_backbone), (self.projector, self.key_projector)]

    @torch.no_grad()
    def keys(self, x: Tensor) -> Tensor:
        """Key embeddings (N, D) of the momentum encoder (no gradient)."""
        return self.key_projector(self.key_backbone(x))


@register("mocov2", MoCoV2Config)
class MoCoV2(_MomentumMethod):
    """MoCo v2: MLP projector, momentum encoder, a queue of `queue_size` negative keys (0: in-batch keys), symmetric
    loss over the two views. Under DDP the keys of every rank are enqueued; use backbone.sync_bn for BN across
    ranks (the role shuffle-BN plays in the paper)."""

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        super().__init__(cfg, backbone, info)
        hidden = cfg.proj_hidden_dim
        self.projector = nn.Sequential(nn.Linear(backbone.num_features, hidden), nn.ReLU(inplace=True),
                                       nn.Linear(hidden, cfg.proj_dim))
        self._make_momentum_encoder()
        self.loss_fn = InfoNCELoss(cfg.temperature)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def head_modules(self) -> list[nn.Module]:
        return [self.probe, self.projector]

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write normalised keys (M, D), gathered from every rank, over the oldest entries (ring buffer)."""
        size = self.queue.shape[0]
        if size == 0:
            return
        keys = F.normalize(dist.gather_no_grad(keys.float()), dim=1)[-size:]
        index = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[index] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    def contrast(self, x1: Tensor, x2: Tensor, progress: Progress) -> tuple[Tensor, Tensor]:
        features = self.backbone(torch.cat([x1, x2]))
        q1, q2 = self.projector(features).chunk(2)
        k1, k2 = self.keys(torch.cat([x1, x2])).chunk(2)
        negatives = self.queue.clone().detach() if self.queue.shape[0] else None
        loss = 0.5 * (self.loss_fn(q1, k2, negatives) + self.loss_fn(q2, k1, negatives))
        self.enqueue(torch.cat([k1, k2]))
        return loss, features


@register("mocov3", MoCoV3Config)
class MoCoV3(_MomentumMethod):
    """MoCo v3: 3-layer projector and 2-layer predictor with BN, momentum encoder, in-batch negatives gathered over
    ranks, symmetric loss scaled by 2τ as in the paper."""

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        super().__init__(cfg, backbone, info)
        self.projector = mlp(backbone.num_features, cfg.proj_hidden_dim, cfg.proj_dim, layers=3, last_bn=True)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, layers=2, last_bn=True)
        self._make_momentum_encoder()
        self.loss_fn = InfoNCELoss(cfg.temperature)

    def head_modules(self) -> list[nn.Module]:
        return [self.probe, self.projector, self.predictor]

    def contrast(self, x1: Tensor, x2: Tensor, progress: Progress) -> tuple[Tensor, Tensor]:
        features = self.backbone(torch.cat([x1, x2]))
        q1, q2 = self.predictor(self.projector(features)).chunk(2)
        k1, k2 = self.keys(torch.cat([x1, x2])).chunk(2)
        loss = (self.loss_fn(q1, k2) + self.loss_fn(q2, k1)) * 2 * self.cfg.temperature
        return loss, features
