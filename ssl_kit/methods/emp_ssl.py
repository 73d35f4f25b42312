"""EMP-SSL (Tong et al. 2023): extreme multi-patch self-supervised learning. Each image is cut into `n_patches`
fixed-size patches (random resized crops of a fixed `patch_scale` of the area, square, resized to the image size,
then colour-augmented); backbone → 3-layer projector → L2 normalise; the loss maximises the total coding rate of each
patch index's batch (ε) and pulls every patch towards the mean embedding of its image's patches (EMPSSLLoss). No
momentum encoder, no predictor, no stop-gradient; under torchrun the rate reads the global batch, as the reference's
single-process training does.

Logged: `coding_rate` and `patch_similarity` (mean cosine of each patch to its image's mean) per step, and
`emp_ssl/embedding_std` (std of the normalised embeddings, ≈ 1/√D healthy, → 0 collapsed; warned once) per epoch.
The evaluations embed whole images with the backbone; the reference's evaluation instead averages the embeddings of
many patches of each image (bag of features)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..config import ViewsConfig
from ..data.loader import Batch
from ..data.views import ContrastiveView
from ..losses import EMPSSLLoss
from ..models.heads import mlp
from .base import Progress
from .collapse import EmbeddingStdWatch
from .pretext import PretextConfig, PretextMethod
from .registry import register


class EMPSSLConfig(PretextConfig):
    """EMP-SSL. Defaults from the reference implementation (tsb0601/EMP-SSL main.py, loss.py, model/model.py,
    dataset/aug.py): ε 0.2, invariance weight 200, rate weight 1; patches of a quarter of the area (16 of 32 px),
    square, flipped, colour jitter p 0.8, grayscale 0.2, blur 0.1, solarize 0.1; projector Linear-BN-ReLU × 2
    then Linear, 4096 wide, 1024 out, L2-normalised. `views` gives the colour strengths; the patch scale, blur and
    solarize are this method's own keys."""

    method: Literal["emp_ssl"]

    recommended = {"optimizer": {"name": "lars", "lr": 0.3, "weight_decay": 1e-4, "momentum": 0.9, "nesterov": True,
                                 "lars_eta": 0.005},
                   "schedule": {"name": "cosine", "warmup_epochs": 0}}
    recommended_source = ("EMP-SSL reference implementation (Tong et al. 2023, tsb0601/EMP-SSL main.py): SGD with "
                          "Nesterov momentum 0.9, lr 0.3 at batch 100 (not scaled), weight decay 1e-4, wrapped in "
                          "LARS with trust coefficient 0.005 (the reference clips the adaptive rate at lr; ours does "
                          "not), cosine decay to 0 over all steps, no warm-up")
    n_patches: int = Field(20, ge=2, description="patches per image (reference README and lightly's example: 20; "
                                                 "main.py default 100; the paper up to 200)")
    patch_scale: float = Field(0.25, gt=0, le=1, description="area of each patch as a fraction of the image, resized "
                                                             "to the image size (reference: 0.25, 16 of 32 px)")
    eps: float = Field(0.2, gt=0, description="ε of the coding rate logdet(I + D/(Nε)·ZᵀZ) (reference: 0.2, "
                                              "unsquared)")
    inv_coef: float = Field(200.0, ge=0, description="weight of the patch invariance term (reference --patch_sim: "
                                                     "200)")
    tcr_coef: float = Field(1.0, ge=0, description="weight of the total coding rate (reference --tcr: 1)")
    proj_hidden_dim: int = Field(4096, ge=1, description="projector hidden width (reference: 4096)")
    proj_dim: int = Field(1024, ge=1, description="embedding dimension D (reference z_dim: 1024)")
    blur_prob: float = Field(0.1, ge=0, le=1, description="Gaussian blur probability of every patch (reference: 0.1)")
    solarize_prob: float = Field(0.1, ge=0, le=1, description="solarize probability of every patch (reference: 0.1)")
    views: ViewsConfig = Field(default_factory=ViewsConfig)

    @model_validator(mode="after")
    def _patch_keys(self) -> "EMPSSLConfig":
        self.views.refuse_per_view_keys("EMP-SSL", "patch_scale, blur_prob and solarize_prob")
        return self


@register("emp_ssl", EMPSSLConfig)
class EMPSSL(PretextMethod):
    """n_patches fixed-size patches → backbone → projector (Linear-BN-ReLU × 2, Linear) → L2 normalise →
    EMPSSLLoss."""

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        super().__init__(cfg, backbone, info)
        self.projector = mlp(backbone.num_features, cfg.proj_hidden_dim, cfg.proj_dim, layers=3)
        self.loss_fn = EMPSSLLoss(cfg.eps, cfg.inv_coef, cfg.tcr_coef)
        self.patch_view = ContrastiveView.from_config(
            self.normalize, cfg.views, cfg.data.hflip, crop_scale=(cfg.patch_scale, cfg.patch_scale),
            crop_ratio=(1.0, 1.0), blur_prob=cfg.blur_prob, solarize_prob=cfg.solarize_prob)
        self.watch = EmbeddingStdWatch("emp_ssl")

    def view_list(self) -> list[nn.Module]:
        """`n_patches` patches of each image."""
        return [self.patch_view] * self.cfg.n_patches

    def head_modules(self) -> list[nn.Module]:
        return [self.probe, self.projector]

    def embed(self, patches: list[Tensor]) -> tuple[Tensor, Tensor]:
        """V patch batches, each (N, C, S, S) -> (backbone features (V·N, F), normalised embeddings (V, N, D))."""
        features = self.backbone(torch.cat(patches))
        z = F.normalize(self.projector(features), dim=-1)
        return features, z.view(len(patches), patches[0].shape[0], -1)

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        patches = self.augment_views(batch)
        features, z = self.embed(patches)
        self.watch.update(z[0])
        rate, invariance = self.loss_fn.terms(z)
        loss = self.loss_fn.weighted(rate, invariance)
        out = self.with_probe("emp_ssl_loss", loss, features, batch.y.repeat(len(patches)))
        return {**out, "coding_rate": rate.detach(), "patch_similarity": -invariance.detach()}

    def epoch_metrics(self) -> dict[str, float]:
        return {**super().epoch_metrics(), **self.watch.epoch_metrics()}
