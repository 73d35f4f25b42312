"""CAPI (Darcet, Baldassarre, Oquab, Mairal, Bojanowski 2025, "Cluster and Predict Latent Patches for Improved Masked
Image Modeling"; facebookresearch/capi): masked image modelling whose targets are the clusters of the EMA teacher's
patch tokens.

Each step, on one crop per image (random resized crop, scale (0.6, 1.0), and a flip where data.hflip allows):
- inverse-block masks (`inverse_block_masks`): int(L · mask_ratio) of the L patches are masked, the visible ones
  forming one rectangle of aspect ratio in (0.5, 2), rolled around the grid; of the masked patches a random
  max(1, int(masked · prediction_subsampling)) are predicted;
- the teacher (the EMA of the student's backbone, in eval mode) encodes the whole crop; the clustering head (an
  `OnlineClustering`: L2-normalised tokens through a Linear onto `num_clusters` prototypes, with bias) maps its patch
  tokens to logits, and position-wise Sinkhorn-Knopp at `teacher_temp` turns them into the targets
  (`capi_assignments`); the head itself is trained by the cross-entropy of its own logits at `clustering_temp`
  against those targets (its gradient reaches the head only);
- the student backbone encodes the visible patches only; the predictor (`CAPIPredictor`: mask-token queries
  cross-attending to the student's tokens, 2-D RoPE positions) predicts the tokens of the predicted positions; the
  student head (L2 normalisation + a weight-normalised Linear, no bias) maps them to cluster logits; loss: their
  cross-entropy at `student_temp` against the targets.
Loss = CAPI loss + clustering loss (they train disjoint parameters, as the reference's two backward passes).

The student's [cls] token rides with the visible patches and is a key/value of the predictor, at the top-left
corner of the visible patches' bounding box (the reference's registers with register_coordinates: zeros and
scale_reg_to_visible: true). What backbone.pt holds is the teacher (the reference's final evaluation uses the EMA
model, student_ema); the paper probes its patch tokens (an attentive probe): backbone.kwargs.global_pool: true
evaluates their mean."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..data.loader import Batch
from ..losses import capi_assignments, capi_cross_entropy
from ..losses.capi import gather_tokens
from ..models.capi_predictor import CAPIPredictor, grid_coordinates
from ..models.vit import VisionTransformer
from .base import Progress, require_vit
from .collapse import EmbeddingStdWatch
from .momentum import frozen_copy, update_momentum_pairs
from .param_groups import ParamGroup, split_off
from .pretext import OneCropMethod, PretextConfig
from .registry import register


class CAPIConfig(PretextConfig):
    """CAPI: student ViT on the visible patches + cross-attention predictor + student head, EMA teacher + online
    clustering head. Defaults: facebookresearch/capi default_pretrain_config.yaml (the paper's ViT-L/14 recipe)."""

    method: Literal["capi"]

    recommended = {"optimizer": {"name": "adamw", "lr": 0.001, "lr_scaling": "none", "base_batch_size": 16384,
                                 "weight_decay": 0.1, "betas": [0.9, 0.95]},
                   "schedule": {"name": "cosine", "warmup_epochs": 58, "min_lr_ratio": 0.0955}}
    recommended_source = ("CAPI reference facebookresearch/capi default_pretrain_config.yaml (optim): AdamW β (0.9, "
                          "0.95), lr 1e-3 at its global batch 16384 (512 per GPU × 32) with no scaling rule, weight "
                          "decay 0.1 (norm weights × 0.1, biases 0: here norms and biases take none), 50k warm-up "
                          "iterations of 500k (10%: 58 ImageNet-22k epochs at 16384) from 0, then a cosine to 0 cut "
                          "at 80% of its course (truncate_cos 0.8), so the run ends at 0.0955 × lr: min_lr_ratio "
                          "0.0955 (our cosine runs its full half period down to it), no gradient clipping")
    num_clusters: int = Field(16384, ge=2, description="prototypes K of the clustering and student heads "
                                                       "(capi.num_clusters)")
    teacher_temp: float = Field(0.06, gt=0, description="temperature of the teacher logits in Sinkhorn-Knopp "
                                                        "(capi.clustering_kwargs.target_temp)")
    student_temp: float = Field(0.12, gt=0, description="temperature of the student's predictions "
                                                        "(capi.student_temp)")
    clustering_temp: float = Field(0.12, gt=0, description="temperature of the clustering head's own prediction "
                                                           "of its targets (capi.clustering_kwargs.pred_temp)")
    sinkhorn_iterations: int = Field(3, ge=1, le=100, description="Sinkhorn-Knopp iterations "
                                                                  "(capi.clustering_kwargs.n_sk_iter)")
    clustering_lr_ratio: float = Field(0.5, gt=0, description="lr of the clustering head ÷ optimizer.lr: the "
                                       "reference's separate clustering optimizer runs at 5e-4 against 1e-3, same "
                                       "warm-up and cosine (capi.clustering_optimizer)")
    mask_ratio: float = Field(0.65, gt=0, lt=1, description="share of the patches masked: int(L · ratio) "
                                                            "(data.mask_ratio)")
    prediction_subsampling: float = Field(0.05, gt=0, le=1, description="share of the masked patches predicted, "
                                          "at least 1 (data.prediction_subsampling)")
    mask_aspect: tuple[float, float] = Field((0.5, 2.0), description="aspect ratio range of the visible block "
                                             "(InverseBlockMasking: min_aspect 0.5, max_aspect 1 / min_aspect)")
    mask_roll: bool = Field(True, description="roll the visible block around the grid by a random shift "
                                              "(data.masking_generator_kwargs.roll)")
    predictor_depth: Optional[int] = Field(None, ge=1, le=64, description="predictor blocks; default: half the "
                                           "encoder's depth, at least 1 (model.decoder_kwargs.depth: 12 for 24)")
    predictor_heads: Optional[int] = Field(None, ge=1, le=64, description="predictor attention heads; default: the "
                                           "encoder's (transformers_kwargs are shared by encoder and decoder)")
    predictor_drop_path: float = Field(0.0, ge=0, lt=1, description="stochastic depth of every predictor block; "
                                       "the reference's ViT-L uses drop_path_rate 0.2 in encoder and decoder, 0 "
                                       "here as the default ViTs' backbone.kwargs.drop_path")
    momentum: float = Field(0.999, ge=0, le=1, description="teacher EMA after the warm-up, rising along a cosine "
                                                           "cut at 80% towards 1 (optim.momentum_schedule)")
    momentum_warmup: float = Field(0.1, ge=0, lt=1, description="share of training over which the momentum "
                                   "falls linearly from 1 (a frozen teacher) to `momentum` (50k of 500k iterations)")
    patch_embed_lr_mult: float = Field(0.2, gt=0, le=1, description="lr factor of the patch embedding "
                                                                    "(optim.patch_embed_lr_mult)")
    crop_scale: tuple[float, float] = Field((0.6, 1.0), description="random resized crop of the input, the only "
                                            "augmentation besides data.hflip (data.crop_scale)")

    @model_validator(mode="after")
    def _ranges(self) -> "CAPIConfig":
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        low, high = self.mask_aspect
        if not 0 < low <= high:
            raise ValueError(f"mask_aspect must satisfy 0 < low <= high, got {self.mask_aspect}")
        return self


# ---------------------------------------------------------------------------------------------- masking
@dataclass
class CAPIMasks:
    """One step's patch indices (row-major, ascending per row): visible (N, V) and predicted (N, P)."""

    visible: Tensor
    predict: Tensor


def visible_block(grid: int, count: int, aspect: tuple[float, float], roll: bool) -> Tensor:
    """bool (grid²,) with exactly `count` (1 ≤ count ≤ grid²) True patches: the first `count` row-major cells of a
    random h × w rectangle, h / w log-uniform in `aspect` (clamped so the rectangle fits), at a uniform position,
    then rolled by a uniform shift on both axes (`roll`). The reference's BlockMasking."""
    low = max(math.log(aspect[0]), math.log(count / grid ** 2))
    high = min(math.log(aspect[1]), math.log(grid ** 2 / (count + 1e-5)))
    ratio = math.exp(low + (high - low) * torch.rand(()).item())
    height = min(grid, math.ceil(math.sqrt(count * ratio)))
    width = min(grid, math.ceil(math.sqrt(count / ratio)))
    top = int(torch.randint(0, grid - height + 1, ()))
    left = int(torch.randint(0, grid - width + 1, ()))
    block = torch.zeros(grid, grid, dtype=torch.bool)
    block[top:top + height, left:left + width] = True
    cells = block.flatten().nonzero().flatten()[:count]
    mask = torch.zeros(grid * grid, dtype=torch.bool)
    mask[cells] = True
    if roll:
        shifts = (int(torch.randint(0, grid, ())), int(torch.randint(0, grid, ())))
        mask = mask.view(grid, grid).roll(shifts, (0, 1)).flatten()
    return mask


def inverse_block_masks(n: int, grid: int, ratio: float, subsampling: float, aspect=(0.5, 2.0),
                        roll: bool = True) -> CAPIMasks:
    """CAPI's masks for n images of grid × grid patches (the reference's InverseBlockMasking and collate): int(L ·
    ratio) patches masked, the L − int(L · ratio) visible ones one (rolled) block; max(1, int(masked · subsampling))
    of the masked patches, drawn uniformly, are predicted. Random numbers: the global CPU generator (the trainer's
    seeded stream). -> CAPIMasks on the CPU."""
    patches = grid * grid
    masked = int(patches * ratio)
    if not 0 < masked < patches:
        raise ValueError(f"mask_ratio {ratio} masks {masked} of {patches} patches: at least one patch must be "
                         f"masked and one visible")
    predicted = max(1, int(masked * subsampling))
    visible = torch.stack([visible_block(grid, patches - masked, aspect, roll) for _ in range(n)])
    score = torch.where(visible, torch.full(visible.shape, 2.0), torch.rand(visible.shape))
    predict = score.topk(predicted, dim=1, largest=False).indices.sort(dim=1).values
    return CAPIMasks(visible.nonzero()[:, 1].view(n, -1), predict)


# ------------------------------------------------------------------------------------------------ heads
class OnlineClustering(nn.Module):
    """The clustering head: tokens (..., D) -> L2-normalised (eps 1e-7) -> Linear with bias onto K prototypes ->
    logits (..., K). Weights N(0, 1), bias 0 (the reference's OnlineClustering)."""

    def __init__(self, dim: int, clusters: int) -> None:
        super().__init__()
        self.layer = nn.Linear(dim, clusters)
        nn.init.normal_(self.layer.weight, std=1.0)
        nn.init.zeros_(self.layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(F.normalize(x, dim=-1, eps=1e-7))


class L2NormLinear(nn.Module):
    """The student head: tokens (..., D) -> L2-normalised -> weight-normalised Linear without bias (W = g · V / ‖V‖
    per prototype, g starting at 1 and trained as in the reference) -> logits (..., K); V truncated-normal 0.02."""

    def __init__(self, dim: int, clusters: int) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(clusters, dim))
        self.weight_g = nn.Parameter(torch.ones(clusters, 1))
        nn.init.trunc_normal_(self.weight_v, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight_g * F.normalize(self.weight_v, dim=1)
        return F.linear(F.normalize(x, dim=-1), weight)


# ------------------------------------------------------------------------------------------------- method
def capi_momentum(base: float, warmup: float, step: int, total: int) -> float:
    """The reference's momentum schedule (WarmupThenCosine: start 1, base `base`, final 1, truncate_cos 0.8): linear
    from 1 to `base` over the first `warmup` share of the steps, then base → 1 along a cosine cut at 80%."""
    warm = int(warmup * total)
    if step < warm:
        return 1.0 + (base - 1.0) * step / max(1, warm - 1)
    progress = min(max((step - warm) / max(1, total - warm), 0.0), 1.0)
    return 1.0 + 0.5 * (base - 1.0) * (1 + math.cos(math.pi * 0.8 * progress))


@register("capi", CAPIConfig)
class CAPI(OneCropMethod):
    """Student backbone + predictor + student head; EMA teacher (saved as backbone.pt) + clustering head."""

    backbone_prefix = "teacher_backbone."

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        require_vit(cfg.name, backbone, "CAPI", "its student encodes the visible patches only")
        super().__init__(cfg, backbone, info)
        dim, heads = backbone.num_features, cfg.predictor_heads or backbone.blocks[0].heads
        if (dim // heads) % 4 or dim % heads:
            raise ValueError(f"stages[{cfg.name}]: CAPI's predictor needs heads dividing the width {dim} into heads "
                             f"of a multiple of 4 channels (2-D RoPE), got predictor_heads {heads}")
        depth = cfg.predictor_depth or max(1, backbone.depth // 2)
        self.predictor = CAPIPredictor(dim, depth, heads, drop_path=cfg.predictor_drop_path)
        self.student_head = L2NormLinear(dim, cfg.num_clusters)
        self.clustering = OnlineClustering(dim, cfg.num_clusters)
        self.teacher_backbone = frozen_copy(backbone)
        self.grid = backbone.grid
        self.register_buffer("coords", grid_coordinates(self.grid), persistent=False)
        self.current_momentum = 1.0
        self.collapse = EmbeddingStdWatch("capi")

    def get_backbone(self) -> nn.Module:
        """The EMA teacher: what backbone.pt holds (the reference's final evaluation: student_ema)."""
        return self.teacher_backbone

    def train(self, mode: bool = True) -> "CAPI":
        super().train(mode)
        self.teacher_backbone.eval()  # the reference's teacher runs in eval mode
        return self

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.teacher_backbone)]

    def after_optimizer_step(self, progress: Progress) -> None:
        """Teacher ← m·teacher + (1 − m)·student, m on the reference's schedule (`capi_momentum`)."""
        cfg = self.cfg
        self.current_momentum = capi_momentum(cfg.momentum, cfg.momentum_warmup, progress.step, progress.total_steps)
        update_momentum_pairs(self.momentum_pairs(), self.current_momentum)

    def parameter_groups(self) -> list[ParamGroup]:
        """Backbone, predictor and student head at lr (patch embedding × patch_embed_lr_mult); the clustering head at
        lr × clustering_lr_ratio without weight decay; the online probe."""
        cfg = self.cfg
        groups = super().parameter_groups()
        patch_embed = [p for p in self.backbone.patch_embed.parameters() if p.requires_grad]
        groups = split_off(groups, ParamGroup("patch_embed", patch_embed,
                                              cfg.optimizer.backbone_lr_scale * cfg.patch_embed_lr_mult))
        return split_off(groups, ParamGroup("clustering", list(self.clustering.parameters()),
                                            cfg.clustering_lr_ratio, weight_decay=False))

    def masks(self, n: int, device) -> CAPIMasks:
        cfg = self.cfg
        masks = inverse_block_masks(n, self.grid, cfg.mask_ratio, cfg.prediction_subsampling, cfg.mask_aspect,
                                    cfg.mask_roll)
        return CAPIMasks(masks.visible.to(device), masks.predict.to(device))

    def teacher_targets(self, x: Tensor, predict: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """crops (N, C, H, W), predicted positions (N, P) -> (targets (N, P, K), clustering loss, pooled teacher
        features (N, D)). Only the clustering head takes a gradient."""
        cfg = self.cfg
        with torch.no_grad():
            tokens = self.teacher_backbone.encode(self.teacher_backbone.embed(x))
        patches = tokens[:, 1:]
        logits = self.clustering(patches)  # (N, L, K)
        assignments = capi_assignments(logits, cfg.teacher_temp, cfg.sinkhorn_iterations)
        clustering_loss = capi_cross_entropy(logits, assignments, cfg.clustering_temp)
        self.collapse.update(F.normalize(patches.detach().float(), dim=-1).flatten(0, 1))
        pooled = patches.mean(dim=1) if self.teacher_backbone.global_pool else tokens[:, 0]
        return gather_tokens(assignments, predict), clustering_loss, pooled.detach()

    def student_predictions(self, x: Tensor, masks: CAPIMasks) -> Tensor:
        """crops (N, C, H, W) -> the student head's logits (N, P, K) at the predicted positions, from the visible
        patches only; the [cls] token sits at the visible box's top-left corner."""
        tokens = self.backbone.embed(x)
        visible = gather_tokens(tokens, masks.visible)
        encoded = self.backbone.encode(visible)  # (N, 1 + V, D)
        coords = self.coords.to(encoded.dtype)
        visible_coords = coords[masks.visible]  # (N, V, 2)
        cls_coords = visible_coords.amin(dim=1, keepdim=True)
        context_coords = torch.cat([cls_coords, visible_coords], dim=1)
        predicted = self.predictor(encoded, context_coords, coords[masks.predict])
        return self.student_head(predicted)

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        x = self.view(batch.x, precropped=batch.views is not None)
        masks = self.masks(x.shape[0], x.device)
        targets, clustering_loss, features = self.teacher_targets(x, masks.predict)
        capi = capi_cross_entropy(self.student_predictions(x, masks), targets, self.cfg.student_temp)
        probe = self.probe_loss(features, batch.y)
        entropy = -torch.xlogy(targets, targets).sum(dim=-1).mean()
        return {"loss": capi + clustering_loss + probe, "capi_loss": capi.detach(),
                "clustering_loss": clustering_loss.detach(), "probe_loss": probe.detach(),
                "capi/target_entropy": entropy, "capi/predicted_fraction": torch.tensor(
                    masks.predict.shape[1] / self.grid ** 2)}

    def epoch_metrics(self) -> dict[str, float]:
        return {**super().epoch_metrics(), **self.collapse.epoch_metrics(),
                "capi/teacher_momentum": self.current_momentum}
