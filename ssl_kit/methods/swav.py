"""SwAV (Caron et al. 2020): swapped prediction of online cluster assignments.

Each crop is projected, L2-normalised and scored against K L2-normalised prototypes; the codes of each of the 2
high-resolution (global) crops are computed without gradient by Sinkhorn-Knopp (ε, iterations; equipartition over
the global batch under torchrun), and every other crop predicts them through softmax(scores / τ). Multi-crop adds
`local_crops` low-resolution crops that only predict. With small batches a queue of earlier batches' projections
(`queue_length`, filled from `queue_start_epochs` on and used once full) joins the batch for Sinkhorn, as in the
paper's small-batch setting. The prototypes are frozen for the first `freeze_prototypes_epochs` and re-normalised to
unit length after every optimizer step.

Collapse is watched through `swav/embedding_std`: the per-dimension standard deviation of the normalised
projections over the batch (SimSiam's diagnostic), ≈ 1/√D when the embeddings spread over the sphere, → 0 when they
collapse; a warning fires once when the epoch mean falls below 0.1/√D (methods/collapse.py)."""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..common import distributed as dist
from ..data.views import ContrastiveView
from ..data.loader import Batch
from ..losses import SwAVLoss
from ..models.heads import mlp
from .base import Progress
from .collapse import EmbeddingStdWatch
from .contrastive import ContrastiveConfig
from .pretext import PretextMethod
from .registry import register



class SwAVConfig(ContrastiveConfig):
    """SwAV: prototypes, Sinkhorn-Knopp codes, swapped prediction, multi-crop, queue, prototype freezing.
    `views` gives the global crops (crop_scale, colour); the local crops reuse its colour strengths."""

    method: Literal["swav"]

    recommended = {"optimizer": {"name": "lars", "lr": 0.3, "lr_scaling": "linear", "base_batch_size": 256, "weight_decay": 1e-6, "momentum": 0.9}, "schedule": {"name": "cosine", "warmup_epochs": 10, "min_lr_ratio": 0.001}}
    recommended_source = ("SwAV (Caron et al. 2020, §A): LARS, lr 4.8 at batch 4096 (0.3 × batch/256), final lr 1/1000 of it, weight decay 1e-6, 10 warm-up epochs, cosine")
    temperature: float = Field(0.1, gt=0, description="softmax temperature τ of the predicted assignments")
    n_prototypes: int = Field(3000, ge=2, description="prototypes K (the paper's 3000)")
    sinkhorn_iterations: int = Field(3, ge=1, description="Sinkhorn-Knopp iterations")
    epsilon: float = Field(0.05, gt=0, description="Sinkhorn entropy regularisation ε")
    local_crops: int = Field(6, ge=0, description="low-resolution crops per image besides the 2 global ones")
    local_crop_scale: tuple[float, float] = Field((0.05, 0.14), description="area range of the local crops")
    local_crop_size: float = Field(0.43, gt=0, le=1, description="local crop side as a fraction of image_size")
    queue_length: int = Field(3840, ge=0, description="queue rows per global crop over all ranks (each rank keeps "
                                                       "queue_length / world); 0: no queue")
    queue_start_epochs: float = Field(15, ge=0, description="epoch from which the queue fills (used once full)")
    freeze_prototypes_epochs: float = Field(1, ge=0, description="prototypes get no update during these epochs")

    @model_validator(mode="after")
    def _crop_ranges(self) -> "SwAVConfig":
        low, high = self.local_crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"local_crop_scale must satisfy 0 < low <= high <= 1, got {self.local_crop_scale}")
        return self


@register("swav", SwAVConfig)
class SwAV(PretextMethod):
    """backbone -> 2-layer MLP projector -> L2 normalise -> prototypes (linear, no bias, unit rows) -> SwAVLoss."""

    @classmethod
    def ddp_find_unused_parameters(cls, cfg) -> bool:
        """The prototypes take no gradient during the first freeze_prototypes_epochs."""
        return True

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        super().__init__(cfg, backbone, info)
        self.projector = mlp(backbone.num_features, cfg.proj_hidden_dim, cfg.proj_dim, layers=2)
        self.prototypes = nn.Linear(cfg.proj_dim, cfg.n_prototypes, bias=False)
        self.normalize_prototypes()
        self.loss_fn = SwAVLoss(cfg.temperature, cfg.sinkhorn_iterations, cfg.epsilon)
        self.global_views = nn.ModuleList([
            ContrastiveView.from_config(self.normalize, cfg.views, cfg.data.hflip),
            ContrastiveView.from_config(self.normalize, cfg.views, cfg.data.hflip,
                                        solarize_prob=cfg.views.solarize_prob)])
        local_size = max(4, int(round(info.image_size * cfg.local_crop_size)))
        self.local_view = ContrastiveView.from_config(self.normalize, cfg.views, cfg.data.hflip,
                                                      crop_scale=cfg.local_crop_scale, out_size=local_size)
        rows = cfg.queue_length // dist.world_size()
        self.register_buffer("queue", torch.zeros(2, rows, cfg.proj_dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self.collapse = EmbeddingStdWatch("swav")

    def view_list(self) -> list[nn.Module]:
        """2 global views, then `local_crops` local views."""
        return [*self.global_views, *[self.local_view] * self.cfg.local_crops]

    def head_modules(self) -> list[nn.Module]:
        return [self.probe, self.projector]

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Scale every prototype (row of the weight (K, D)) to unit length."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """images (M, C, S, S) -> (backbone features (M, F), normalised projections (M, D))."""
        features = self.backbone(x)
        return features, F.normalize(self.projector(features), dim=1)

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        frozen = progress.step < self.cfg.freeze_prototypes_epochs * progress.steps_per_epoch
        self.prototypes.weight.requires_grad_(not frozen)
        views = self.augment_views(batch)
        features, z_global = self.embed(torch.cat(views[:2]))
        high = list(self.prototypes(z_global).chunk(2))
        low: list[Tensor] = []
        if self.cfg.local_crops:
            _, z_local = self.embed(torch.cat(views[2:]))
            low = list(self.prototypes(z_local).chunk(self.cfg.local_crops))
        loss = self.loss_fn(high, low, self.queue_scores())
        self.enqueue(z_global.chunk(2), progress)
        self.collapse.update(z_global)
        probe = self.probe_loss(features, batch.y.repeat(2))
        return {"loss": loss + probe, "swav_loss": loss.detach(), "probe_loss": probe.detach()}

    @torch.no_grad()
    def queue_scores(self) -> Optional[list[Tensor]]:
        """Scores (M, K) of each global crop's queue against the current prototypes, once the queue is full."""
        rows = self.queue.shape[1]
        if rows == 0 or int(self.queue_filled) < rows:
            return None
        weight = self.prototypes.weight.detach()
        return [self.queue[i].to(weight.dtype) @ weight.T for i in range(2)]

    @torch.no_grad()
    def enqueue(self, z: tuple[Tensor, ...], progress: Progress) -> None:
        """From queue_start_epochs on: put each global crop's normalised projections (N, D) at the front of its
        queue, dropping the oldest rows (the reference's shift)."""
        rows = self.queue.shape[1]
        if rows == 0 or progress.step < self.cfg.queue_start_epochs * progress.steps_per_epoch:
            return
        for i, crop in enumerate(z):
            new = crop.detach().to(self.queue.dtype)[:rows]
            self.queue[i] = torch.cat([new, self.queue[i, :rows - new.shape[0]]])
        self.queue_filled.copy_(torch.clamp(self.queue_filled + z[0].shape[0], max=rows))

    def after_optimizer_step(self, progress: Progress) -> None:
        super().after_optimizer_step(progress)
        self.normalize_prototypes()

    def epoch_metrics(self) -> dict[str, float]:
        return {**super().epoch_metrics(), **self.collapse.epoch_metrics()}
