"""MSN (Assran et al. 2022, "Masked Siamese Networks for Label-Efficient Learning"), with PMSN's power-law prior
(Assran et al. 2023) as `regularization: power_law`.

Each step, per image: one target view (a global crop) goes, unmasked, through the target encoder (the EMA of the
backbone) and the target projection head; the anchor views — `rand_views` global crops and `focal_views` small crops
— go through the backbone with a random `mask_ratio` share of their patches dropped (the encoder only processes the
kept tokens, as in the paper's patch dropping) and through the projection head. Both are compared by cosine to K
learnable prototypes (`msn_loss`): the anchors' prototype distribution at `temperature` must match the target's,
sharpened (and Sinkhorn-normalised); a mean-entropy maximisation term (me-max), or PMSN's KL to a power-law prior,
over the global batch keeps every prototype in use. The target encoder and head follow a momentum rising linearly
from 0.996 to 1 (the reference). backbone.pt holds the target encoder (what the reference evaluates).

Collapse is watched through `msn/embedding_std` (the spread of the target projections, collapse.py) and
`msn/target_entropy` / `msn/mean_anchor_entropy` (→ 0 / → ln K)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config import ViewsConfig
from ..data.loader import Batch
from ..data.views import ContrastiveView
from ..losses.msn import msn_loss, msn_target_probs
from ..models.vit import VisionTransformer
from .base import Progress, require_vit
from .collapse import EmbeddingStdWatch
from .ijepa import linear_ramp, random_true
from .momentum import frozen_copy, update_momentum_pairs
from .pretext import PretextConfig, PretextMethod
from .registry import register

REFERENCE = "facebookresearch/msn configs/pretrain/msn_vits16.yaml"


class MSNConfig(PretextConfig):
    """MSN / PMSN: EMA target encoder on one unmasked view, the backbone on masked anchor views, matching of
    prototype distributions with me-max (MSN) or a power-law prior (PMSN)."""

    method: Literal["msn"]

    recommended = {"optimizer": {"name": "adamw", "lr": 0.001, "lr_scaling": "linear", "base_batch_size": 1024,
                                 "weight_decay": 0.04, "betas": [0.9, 0.999]},
                   "schedule": {"name": "cosine", "warmup_epochs": 15, "warmup_start": 0.2, "min_lr_ratio": 0.001,
                                "weight_decay_end": 0.4},
                   "train": {"clip_grad_norm": 3.0}}
    recommended_source = (f"{REFERENCE} (ViT-S/16): AdamW, lr 1e-3 (taken at batch 1024: the config's batch_size "
                          f"64 is per GPU), warm-up 15 epochs from 2e-4, cosine to 1e-6, gradient clipping 3.0; "
                          f"weight decay 0.04 rising to 0.4 along a cosine over the run (its CosineWDSchedule, "
                          f"final_weight_decay 0.4)")
    num_prototypes: int = Field(1024, ge=2, le=65536, description="K learnable prototypes (the reference: 1024)")
    hidden_dim: int = Field(2048, ge=1, description="projection head hidden width (the reference: 2048)")
    output_dim: int = Field(256, ge=1, description="projection / prototype dimension (the reference: 256)")
    temperature: float = Field(0.1, gt=0, description="anchor softmax temperature (the reference and lightly: 0.1)")
    target_sharpen_temperature: float = Field(0.25, gt=0, le=1, description="sharpening T of the target "
                                              "probabilities, p^(1/T) renormalised (the reference's T 0.25: an "
                                              "effective target temperature 0.1 × 0.25 = 0.025)")
    sinkhorn_iterations: int = Field(3, ge=0, le=100, description="Sinkhorn normalisation of the targets, 0 off "
                                     "(the reference: use_sinkhorn true, 3 iterations; lightly: 3)")
    regularization: Literal["me_max", "power_law", "none"] = Field("me_max", description="me_max: MSN's mean-"
                                                                    "entropy maximisation; power_law: PMSN's "
                                                                    "KL(prior ‖ mean anchor probability), lightly's "
                                                                    "PMSNLoss")
    regularization_weight: float = Field(1.0, ge=0, description="λ of the regulariser (the reference's "
                                         "memax_weight 1; lightly: 1)")
    power_law_exponent: float = Field(0.25, ge=0, description="PMSN prior ∝ k^(−exponent) (lightly: 0.25)")
    mask_ratio: float = Field(0.15, ge=0, lt=1, description="share of each anchor view's patches dropped (the "
                              "reference ViT-S/16: patch_drop 0.15)")
    rand_views: int = Field(1, ge=1, le=8, description="global anchor views (the reference: 1)")
    focal_views: int = Field(10, ge=0, le=32, description="focal (small) anchor views (the reference: 10)")
    global_crop_scale: tuple[float, float] = Field((0.3, 1.0), description="crop scale of the target and global "
                                                   "anchor views (lightly's MSNTransform random_crop_scale 0.3-1.0)")
    focal_crop_scale: tuple[float, float] = Field((0.05, 0.3), description="crop scale of the focal views "
                                                  "(lightly's MSNTransform focal_crop_scale 0.05-0.3)")
    focal_crop_size: float = Field(0.43, gt=0, le=1, description="focal view side as a fraction of image_size "
                                   "(the reference: 96 of 224 px)")
    momentum: float = Field(0.996, ge=0, le=1, description="target EMA, linear from this value to 1 (the reference)")
    views: ViewsConfig = Field(default_factory=ViewsConfig)


class MSNProjector(nn.Module):
    """The reference's 3-layer projection head: Linear-BN-GELU, Linear-BN-GELU, Linear. (N, F) -> (N, out)."""

    def __init__(self, in_dim: int, hidden: int, out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.GELU(), nn.Linear(hidden, out))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def pool(encoder: VisionTransformer, tokens: Tensor) -> Tensor:
    """Encoded tokens (N, 1 + L, D) -> the encoder's features: [cls], or the patch mean with global_pool."""
    return tokens[:, 1:].mean(dim=1) if encoder.global_pool else tokens[:, 0]


@register("msn", MSNConfig)
class MSN(PretextMethod):
    backbone_prefix = "target_encoder."

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        require_vit(cfg.name, backbone, "MSN", "its anchor views drop patches")
        super().__init__(cfg, backbone, info)
        self.projector = MSNProjector(backbone.num_features, cfg.hidden_dim, cfg.output_dim)
        self.prototypes = nn.Parameter(torch.empty(cfg.num_prototypes, cfg.output_dim))
        nn.init.uniform_(self.prototypes, -(1.0 / cfg.output_dim) ** 0.5, (1.0 / cfg.output_dim) ** 0.5)
        self.target_encoder = frozen_copy(backbone)
        self.target_projector = frozen_copy(self.projector)
        self.global_view = ContrastiveView.from_config(self.normalize, cfg.views, cfg.data.hflip,
                                                       crop_scale=cfg.global_crop_scale)
        patch = backbone.patch_size  # a focal side of whole patches, at least one patch
        focal_size = max(patch, int(round(info.image_size * cfg.focal_crop_size / patch)) * patch)
        self.focal_view = ContrastiveView.from_config(self.normalize, cfg.views, cfg.data.hflip,
                                                      crop_scale=cfg.focal_crop_scale, out_size=focal_size)
        self.current_momentum = cfg.momentum
        self.collapse = EmbeddingStdWatch("msn")

    def view_list(self) -> list[nn.Module]:
        """The target view, then rand_views global anchors, then focal_views focal anchors."""
        return [self.global_view] * (1 + self.cfg.rand_views) + [self.focal_view] * self.cfg.focal_views

    def get_backbone(self) -> nn.Module:
        """The target encoder: what the reference evaluates and backbone.pt holds."""
        return self.target_encoder

    def train(self, mode: bool = True) -> "MSN":
        super().train(mode)
        self.target_encoder.eval()
        return self

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.target_encoder), (self.projector, self.target_projector)]

    def after_optimizer_step(self, progress: Progress) -> None:
        self.current_momentum = linear_ramp(self.cfg.momentum, 1.0, progress.step, progress.total_steps)
        update_momentum_pairs(self.momentum_pairs(), self.current_momentum)

    def encode_masked(self, x: Tensor) -> Tensor:
        """Anchor images (N, C, S, S) -> backbone features (N, D) from L − ⌊mask_ratio·L⌋ random patches (at least
        one) of the L patches: the dropped ones never enter the encoder."""
        tokens = self.backbone.embed(x)
        length = tokens.shape[1]
        keep = max(1, length - int(self.cfg.mask_ratio * length))
        if keep < length:
            kept = random_true(torch.ones(tokens.shape[0], length, dtype=torch.bool), keep).to(x.device)
            tokens = torch.gather(tokens, 1, kept.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return pool(self.backbone, self.backbone.encode(tokens))

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        views = self.augment_views(batch)
        with torch.no_grad():
            features = self.target_encoder(views[0])
            targets = self.target_projector(features)
        anchor_global = torch.cat(views[1:1 + cfg.rand_views])
        anchors = [self.projector(self.encode_masked(anchor_global))]
        if cfg.focal_views:
            anchors.append(self.projector(self.encode_masked(torch.cat(views[1 + cfg.rand_views:]))))
        anchors = torch.cat(anchors).float()
        loss = msn_loss(anchors, targets.float(), self.prototypes, cfg.temperature, cfg.target_sharpen_temperature,
                        cfg.sinkhorn_iterations, cfg.regularization, cfg.regularization_weight,
                        cfg.power_law_exponent, gather_distributed=True)
        self.collapse.update(targets.float())
        stats = self._stats(anchors.detach(), targets.detach().float())
        return {**self.with_probe("msn_loss", loss, features, batch.y), **stats}

    @torch.no_grad()
    def _stats(self, anchors: Tensor, targets: Tensor) -> dict[str, Tensor]:
        cfg = self.cfg
        t = msn_target_probs(targets, self.prototypes, cfg.temperature, cfg.target_sharpen_temperature, 0)
        protos = F.normalize(self.prototypes.detach().float(), dim=1)
        mean_p = F.softmax(F.normalize(anchors, dim=1) @ protos.T / cfg.temperature, dim=1).mean(dim=0)
        entropy = lambda p: -(p * torch.log(p.clamp_min(1e-12))).sum(-1)  # noqa: E731
        return {"msn/target_entropy": entropy(t).mean(), "msn/mean_anchor_entropy": entropy(mean_p)}

    def epoch_metrics(self) -> dict[str, float]:
        return {**super().epoch_metrics(), **self.collapse.epoch_metrics(),
                "msn/target_momentum": self.current_momentum}
