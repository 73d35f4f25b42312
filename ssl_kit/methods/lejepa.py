"""LeJEPA (Balestriero & LeCun 2025): one network, no teacher, no stop-gradient. Each image is seen in
`global_views` global and `local_crops` local (smaller, lower-resolution) crops; backbone → 3-layer projector; every
view's projection predicts the mean projection of the image's global views (squared error), and SIGReg pulls each
view's batch of projections towards an isotropic Gaussian (an Epps-Pulley characteristic-function test on
`num_slices` random 1-D projections). loss = λ·SIGReg + (1 − λ)·prediction (LeJEPALoss); under torchrun SIGReg
reads the global batch, as in the reference.

Logged: `sigreg` and `prediction` per step, and `lejepa/embedding_std` (the std of the normalised global
projections, ≈ 1/√D healthy, → 0 collapsed; warned once, methods/collapse.py) per epoch."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..config import ViewsConfig
from ..data.loader import Batch
from ..data.views import ContrastiveView
from ..losses import LeJEPALoss
from ..models.heads import mlp
from .base import Progress
from .collapse import EmbeddingStdWatch
from .pretext import PretextConfig, PretextMethod
from .registry import register


class LeJEPAConfig(PretextConfig):
    """LeJEPA. Defaults from the reference implementation (rbalestr-lab/lejepa README "GOTO hyperparameters" and
    MINIMAL.md) and lightly's LeJEPALoss / LeJEPAProjectionHead: λ 0.05, 1024 slices, 17 knots on [0, 3]; 2 global
    crops (scale 0.3-1) + 6 local crops (scale 0.05-0.3, 98/224 of the side); colour jitter p 0.8, grayscale 0.2,
    blur 0.5, solarize 0.2 on every view; projector Linear-BN-ReLU × 2 then Linear, 2048 wide, 64 out. `views`
    gives the colour strengths; the crop scales, blur and solarize are this method's own keys."""

    method: Literal["lejepa"]

    recommended = {"optimizer": {"name": "adamw", "lr": 5e-4, "weight_decay": 0.05, "betas": [0.9, 0.999]},
                   "schedule": {"name": "cosine", "warmup_epochs": 1, "warmup_start": 0.01, "min_lr_ratio": 0.001}}
    recommended_source = ("LeJEPA reference implementation (Balestriero & LeCun 2025, rbalestr-lab/lejepa README "
                          "and MINIMAL.md): AdamW, lr 5e-4 for every model and batch size, weight decay 5e-2 for "
                          "ViTs (the README gives 5e-4 for ResNets), linear warm-up (1 epoch from 0.01×, MINIMAL.md) "
                          "then cosine decay to lr/1000")
    sigreg_weight: float = Field(0.05, ge=0, le=1, description="λ: loss = λ·SIGReg + (1 − λ)·prediction (reference, "
                                                              "lightly: 0.05; the paper explores 0.01-0.1)")
    num_slices: int = Field(1024, ge=1, description="random 1-D projections SIGReg tests per step (reference, "
                                                    "lightly: 1024)")
    knots: int = Field(17, ge=2, description="integration points of the Epps-Pulley statistic on [0, t_max] "
                                             "(reference, lightly: 17)")
    t_max: float = Field(3.0, gt=0, description="upper end of the frequency grid (reference, lightly: 3)")
    proj_hidden_dim: int = Field(2048, ge=1, description="projector hidden width (reference MINIMAL.md, lightly "
                                                         "LeJEPAProjectionHead: 2048)")
    proj_dim: int = Field(64, ge=1, description="projection dimension D (lightly LeJEPAProjectionHead: 64; "
                                                "MINIMAL.md: 16)")
    global_views: int = Field(2, ge=1, description="global crops per image; they form the prediction target "
                                                   "(reference: 2)")
    local_crops: int = Field(6, ge=0, description="local crops per image besides the global ones (reference: 6)")
    global_crop_scale: tuple[float, float] = Field((0.3, 1.0), description="area range of the global crops "
                                                                           "(reference: 0.3-1)")
    local_crop_scale: tuple[float, float] = Field((0.05, 0.3), description="area range of the local crops "
                                                                           "(reference: 0.05-0.3)")
    local_crop_size: float = Field(98 / 224, gt=0, le=1, description="local crop side as a fraction of image_size "
                                                                    "(reference: 98 px of 224)")
    blur_prob: float = Field(0.5, ge=0, le=1, description="Gaussian blur probability of every view (reference: 0.5)")
    solarize_prob: float = Field(0.2, ge=0, le=1, description="solarize probability of every view (reference: 0.2)")
    views: ViewsConfig = Field(default_factory=ViewsConfig)

    @model_validator(mode="after")
    def _crops(self) -> "LeJEPAConfig":
        self.views.refuse_per_view_keys("LeJEPA", "global_crop_scale, local_crop_scale, blur_prob and "
                                                  "solarize_prob")
        for key in ("global_crop_scale", "local_crop_scale"):
            low, high = getattr(self, key)
            if not 0 < low <= high <= 1:
                raise ValueError(f"{key} must satisfy 0 < low <= high <= 1, got {getattr(self, key)}")
        return self


@register("lejepa", LeJEPAConfig)
class LeJEPA(PretextMethod):
    """Global + local crops → backbone → projector (Linear-BN-ReLU × 2, Linear) → LeJEPALoss."""

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        super().__init__(cfg, backbone, info)
        self.projector = mlp(backbone.num_features, cfg.proj_hidden_dim, cfg.proj_dim, layers=3)
        self.loss_fn = LeJEPALoss(cfg.sigreg_weight, cfg.num_slices, cfg.knots, cfg.t_max)
        colour = dict(blur_prob=cfg.blur_prob, solarize_prob=cfg.solarize_prob)
        self.global_view = ContrastiveView.from_config(self.normalize, cfg.views, cfg.data.hflip,
                                                       crop_scale=cfg.global_crop_scale, **colour)
        local_size = max(4, int(round(info.image_size * cfg.local_crop_size)))
        self.local_view = ContrastiveView.from_config(self.normalize, cfg.views, cfg.data.hflip,
                                                      crop_scale=cfg.local_crop_scale, out_size=local_size, **colour)
        self.watch = EmbeddingStdWatch("lejepa")

    def view_list(self) -> list[nn.Module]:
        """`global_views` global crops, then `local_crops` local crops."""
        return [self.global_view] * self.cfg.global_views + [self.local_view] * self.cfg.local_crops

    def head_modules(self) -> list[nn.Module]:
        return [self.probe, self.projector]

    def project(self, views: list[Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        """The augmented views (global first) -> (global backbone features (Vg·N, F), global projections
        (Vg, N, D), local projections (Vl, N, D) or None). Both kinds of crop go through one projector call, so its
        batch norm sees every view, as in the reference."""
        n_global, n = self.cfg.global_views, views[0].shape[0]
        global_features = self.backbone(torch.cat(views[:n_global]))
        features = [global_features]
        if len(views) > n_global:
            features.append(self.backbone(torch.cat(views[n_global:])))
        z = self.projector(torch.cat(features)).view(len(views), n, -1)
        return global_features, z[:n_global], (z[n_global:] if len(views) > n_global else None)

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        views = self.augment_views(batch)
        features, global_z, local_z = self.project(views)
        self.watch.update(global_z[0])
        sigreg_term, prediction = self.loss_fn.terms(global_z, local_z)
        loss = self.loss_fn.weighted(sigreg_term, prediction)
        out = self.with_probe("lejepa_loss", loss, features, batch.y.repeat(self.cfg.global_views))
        return {**out, "sigreg": sigreg_term.detach(), "prediction": prediction.detach()}

    def epoch_metrics(self) -> dict[str, float]:
        return {**super().epoch_metrics(), **self.watch.epoch_metrics()}
