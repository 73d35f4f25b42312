"""I-JEPA (Assran et al. 2023): predict, from one context block of an image, the representations of several target
blocks of the same image, in the space of an EMA target encoder. No pixel augmentation beyond a random resized crop
(and a flip where data.hflip allows), no negatives, no pixel reconstruction.

Each step, on one crop per image:
- multi-block masks (`sample_multiblock_masks`): 4 target blocks (scale (0.15, 0.2), aspect h/w (0.75, 1.5)) and 1
  context block (scale (0.85, 1.0), square) with every target patch removed from it;
- the target encoder (the EMA of the context encoder) encodes the whole crop; its patch tokens, layer-normalised over
  the features, at the target blocks are the targets;
- the context encoder (the backbone being trained) encodes the context patches only;
- the predictor (`JEPAPredictor`, a narrow ViT) reads the context tokens plus one mask token per target patch,
  carrying that patch's position, and predicts each block's target tokens; loss `ijepa_loss` (smooth L1).
The target encoder follows the context encoder with a momentum rising linearly from 0.996 to 1 (the paper).

What backbone.pt holds is the target encoder, as in the paper ("we use the target-encoder for evaluation and average
pool its output"): it is what the reference evaluates, and its averaged weights are the smoother of the two. The paper's
ViT has no [cls] token; ssl_kit's has one, which I-JEPA carries through both encoders but never regresses: set
backbone.kwargs.global_pool: true to evaluate the average-pooled patch tokens as the paper does.

Collapse (every patch mapped to one representation, which the EMA target alone does not rule out) is watched through
`ijepa/embedding_std`: the per-dimension std, over every target patch of the batch, of the layer-normed target tokens
the loss regresses (see collapse.py). The pooled features are not watched: a ViT's pooled tokens share a large common
component from the start, so their spread on the unit sphere is small without any collapse."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..data.loader import Batch
from ..errors import ConfigError
from ..losses import ijepa_loss
from ..models.jepa_predictor import JEPAPredictor
from ..models.vit import VisionTransformer
from .base import Progress, require_vit
from .collapse import EmbeddingStdWatch
from .momentum import frozen_copy, update_momentum_pairs
from .pretext import OneCropMethod, PretextConfig
from .registry import register

MASK_TRIES = 20  # target and context positions drawn per image (the reference's timeout: 20 tries)


class IJEPAConfig(PretextConfig):
    """I-JEPA: context encoder on one context block, EMA target encoder on the whole image, a narrow ViT predictor
    regressing the target blocks' representations. The predictor's shape defaults follow the paper's ViT-B/16
    setting relative to the encoder (width 384 = half of 768, depth 6 = half of 12, the encoder's heads)."""

    method: Literal["ijepa"]

    recommended = {"optimizer": {"name": "adamw", "lr": 0.001, "lr_scaling": "linear", "base_batch_size": 2048, "weight_decay": 0.04, "betas": [0.9, 0.999]}, "schedule": {"name": "cosine", "warmup_epochs": 40, "warmup_start": 0.2, "min_lr_ratio": 0.001, "weight_decay_end": 0.4}}
    recommended_source = ("I-JEPA reference config configs/in1k_vith14_ep300.yaml (facebookresearch/ijepa): AdamW, "
                          "lr 1e-3 at batch 2048 (16 GPUs x 128), linear warm-up from 2e-4 over 40 epochs, cosine to "
                          "1e-6, no gradient clipping; weight decay 0.04 rising to 0.4 along a cosine over the run "
                          "(its CosineWDSchedule, final_weight_decay 0.4)")
    predictor_depth: Optional[int] = Field(None, ge=1, le=64, description="predictor blocks; default: half the "
                                           "encoder's depth, at least 1 (the paper's ViT-B/16: 6 for 12)")
    predictor_dim: Optional[int] = Field(None, ge=4, le=4096, description="predictor width; default: half the "
                                         "encoder's width rounded down to a multiple of 4 and of the heads (the "
                                         "paper's ViT-B/16: 384 for 768)")
    predictor_heads: Optional[int] = Field(None, ge=1, le=64, description="predictor attention heads; default: the "
                                           "encoder's (the paper)")
    num_targets: int = Field(4, ge=1, le=16, description="target blocks per image (the paper: 4)")
    target_scale: tuple[float, float] = Field((0.15, 0.2), description="area fraction of each target block, "
                                              "uniform in this range (the paper)")
    target_aspect: tuple[float, float] = Field((0.75, 1.5), description="height / width of the target blocks, "
                                               "uniform in this range (the paper)")
    context_scale: tuple[float, float] = Field((0.85, 1.0), description="area fraction of the square context "
                                               "block before the targets are removed from it (the paper)")
    min_context_fraction: float = Field(0.04, ge=0, lt=1, description="fewest context patches an image keeps after "
                                        "the targets are removed, as a fraction of the patches, at least 1 (the "
                                        "reference's min_keep: more than 10 of 16 x 16)")
    momentum: float = Field(0.996, ge=0, le=1, description="target encoder EMA: linear from this value to 1 over "
                                                           "training (the paper)")
    loss: Literal["smooth_l1", "l2"] = Field("smooth_l1", description="smooth_l1: the reference code; l2: the "
                                             "paper's eq. 1 (as a mean)")
    crop_scale: tuple[float, float] = Field((0.3, 1.0), description="random resized crop of the input, the only "
                                            "augmentation besides data.hflip (the reference's crop_scale)")

    @model_validator(mode="after")
    def _ranges(self) -> "IJEPAConfig":
        for key in ("target_scale", "context_scale", "crop_scale"):
            low, high = getattr(self, key)
            if not 0 < low <= high <= 1:
                raise ValueError(f"{key} must satisfy 0 < low <= high <= 1, got {getattr(self, key)}")
        low, high = self.target_aspect
        if not 0 < low <= high:
            raise ValueError(f"target_aspect must satisfy 0 < low <= high, got {self.target_aspect}")
        return self


# ------------------------------------------------------------------------------------------ multi-block masks
@dataclass
class MultiBlockMasks:
    """One step's masks, as row-major patch numbers of a grid × grid image, ascending within each row.

    context: (N, C) the patches the context encoder sees (C: the batch's smallest context, the others cut to it);
    targets: (N, M, T) the patches of each of the M target blocks (T = target_shape[0] · target_shape[1]);
    target_shape, context_shape: the (height, width) in patches every block of this step has."""

    context: Tensor
    targets: Tensor
    target_shape: tuple[int, int]
    context_shape: tuple[int, int]


def uniform(low: float, high: float, generator: Optional[torch.Generator]) -> float:
    """One draw from U(low, high) on the CPU generator (the global one when None)."""
    return low + (high - low) * torch.rand((), generator=generator).item()


def block_shape(grid: int, scale: tuple[float, float], aspect: tuple[float, float],
                generator: Optional[torch.Generator] = None) -> tuple[int, int]:
    """(height, width) in patches of a block of ⌊s·grid²⌋ patches (at least 1) and height/width r, s ~ U(scale) and
    r ~ U(aspect) drawn independently (the paper); each side rounded, within [1, grid] (on small grids the rounding to
    whole patches dominates the drawn scale)."""
    area = max(1, int(uniform(*scale, generator) * grid * grid))
    ratio = uniform(*aspect, generator)
    height = min(grid, max(1, round(math.sqrt(area * ratio))))
    width = min(grid, max(1, round(math.sqrt(area / ratio))))
    return height, width


def place_blocks(n: int, count: int, grid: int, shape: tuple[int, int],
                 generator: Optional[torch.Generator] = None) -> Tensor:
    """`count` blocks of `shape` at uniform positions inside the grid, for each of n images.
    -> bool (n, count, grid²), True inside the block."""
    height, width = shape
    top = torch.randint(0, grid - height + 1, (n, count, 1), generator=generator)
    left = torch.randint(0, grid - width + 1, (n, count, 1), generator=generator)
    cells = torch.arange(grid)
    rows = (cells >= top) & (cells < top + height)
    cols = (cells >= left) & (cells < left + width)
    return (rows.unsqueeze(-1) & cols.unsqueeze(-2)).flatten(-2)


def first_true(mask: Tensor, count: int) -> Tensor:
    """bool (..., L) with at least `count` True per row -> long (..., count): the first `count` True positions."""
    order = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices
    return order[..., :count]


def random_true(mask: Tensor, count: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """bool (n, L) with at least `count` True per row -> long (n, count): `count` of its True positions drawn
    uniformly without replacement, ascending."""
    score = torch.where(mask, torch.rand(mask.shape, generator=generator), torch.full(mask.shape, 2.0))
    return score.topk(count, dim=-1, largest=False).indices.sort(dim=-1).values


def sample_multiblock_masks(n: int, grid: int, num_targets: int = 4, target_scale=(0.15, 0.2),
                            target_aspect=(0.75, 1.5), context_scale=(0.85, 1.0), min_context: int = 1,
                            generator: Optional[torch.Generator] = None) -> MultiBlockMasks:
    """I-JEPA's multi-block masks for n images of grid × grid patches (the paper's appendix A.1, the reference's
    MaskCollator). One target block shape and one square context block shape are drawn per call (the reference
    shares them across the batch, so that every image has as many patches); each image then gets its own positions:
    num_targets target blocks (which may overlap each other) and a context block with every target patch removed.

    Positions are drawn MASK_TRIES times per image and the first draw leaving at least `min_context` context patches
    is kept, else the draw leaving most (the reference redraws the context until more than min_keep patches remain,
    and past its timeout lets the context overlap the targets: here targets and context never overlap). Every
    context is then cut to the batch's smallest by dropping patches at random (the reference keeps the first ones in
    row-major order, which takes the cut from the bottom rows of the larger contexts only). Random numbers come from
    `generator` (the global CPU generator when None: the trainer's seeded stream). -> MultiBlockMasks on the CPU."""
    target_shape = block_shape(grid, target_scale, target_aspect, generator)
    context_shape = block_shape(grid, context_scale, (1.0, 1.0), generator)
    patches = grid * grid
    targets = place_blocks(n * MASK_TRIES, num_targets, grid, target_shape, generator)
    contexts = place_blocks(n * MASK_TRIES, 1, grid, context_shape, generator)[:, 0] & ~targets.any(dim=1)
    targets, contexts = targets.view(n, MASK_TRIES, num_targets, patches), contexts.view(n, MASK_TRIES, patches)
    kept = contexts.sum(dim=-1)  # (n, tries)
    enough = kept >= min_context
    choice = torch.where(enough.any(dim=1), enough.to(torch.uint8).argmax(dim=1), kept.argmax(dim=1))
    rows = torch.arange(n)
    context, targets = contexts[rows, choice], targets[rows, choice]
    smallest = int(context.sum(dim=-1).min())
    if smallest == 0:
        raise ConfigError(f"I-JEPA masks: the {num_targets} target blocks of {target_shape[0]}x{target_shape[1]} "
                          f"patches covered every patch of the {context_shape[0]}x{context_shape[1]} context block "
                          f"in all {MASK_TRIES} draws; lower num_targets or target_scale, or raise context_scale")
    return MultiBlockMasks(random_true(context, smallest, generator),
                           first_true(targets, target_shape[0] * target_shape[1]), target_shape, context_shape)


# -------------------------------------------------------------------------------------------------- the method
def linear_ramp(start: float, end: float, step: int, total: int) -> float:
    """start -> end linearly over `total` steps (I-JEPA's momentum schedule: 0.996 -> 1)."""
    return start + (end - start) * min(max(step / max(1, total), 0.0), 1.0)


def predictor_shape(cfg: IJEPAConfig, encoder: VisionTransformer) -> tuple[int, int, int]:
    """(width, depth, heads) of the predictor: the config's, or the paper's ViT-B/16 proportions of the encoder."""
    heads = cfg.predictor_heads or encoder.blocks[0].heads
    depth = cfg.predictor_depth or max(1, encoder.depth // 2)
    unit = math.lcm(4, heads)
    if cfg.predictor_dim is None:
        return max(unit, encoder.num_features // 2 // unit * unit), depth, heads
    if cfg.predictor_dim % unit:
        raise ConfigError(f"stages[{cfg.name}].predictor_dim {cfg.predictor_dim} must be a multiple of 4 (sin-cos "
                          f"positions) and of the {heads} predictor heads")
    return cfg.predictor_dim, depth, heads


@register("ijepa", IJEPAConfig)
class IJEPA(OneCropMethod):
    """Context encoder (the backbone) + EMA target encoder (saved as backbone.pt) + narrow ViT predictor."""

    backbone_prefix = "target_encoder."

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        require_vit(cfg.name, backbone, "I-JEPA", "its context encoder sees the context block's patches only")
        super().__init__(cfg, backbone, info)
        if not backbone.global_pool:
            warnings.warn(f"stages[{cfg.name}]: I-JEPA regresses patch tokens and never the [cls] token, which this "
                          f"ViT's features are; set backbone.kwargs.global_pool: true to evaluate the average-pooled "
                          f"patch tokens, as the paper does")
        self.grid = backbone.grid
        dim, depth, heads = predictor_shape(cfg, backbone)
        self.predictor = JEPAPredictor(backbone.num_features, self.grid, dim, depth, heads)
        self.target_encoder = frozen_copy(backbone)
        self.min_context = max(1, math.ceil(cfg.min_context_fraction * self.grid ** 2))
        self.current_momentum = cfg.momentum
        self.collapse = EmbeddingStdWatch("ijepa")

    def get_backbone(self) -> nn.Module:
        """The target encoder: what the paper evaluates and backbone.pt holds."""
        return self.target_encoder

    def train(self, mode: bool = True) -> "IJEPA":
        super().train(mode)
        self.target_encoder.eval()  # targets without stochastic depth, whatever the backbone's drop_path
        return self

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.target_encoder)]

    def after_optimizer_step(self, progress: Progress) -> None:
        """Target ← m·target + (1 − m)·context encoder, m linear from `momentum` to 1 (the paper), not the cosine
        ramp of BYOL/DINO."""
        self.current_momentum = linear_ramp(self.cfg.momentum, 1.0, progress.step, progress.total_steps)
        update_momentum_pairs(self.momentum_pairs(), self.current_momentum)

    def masks(self, n: int, device) -> MultiBlockMasks:
        """This step's masks for n images, from the trainer's random stream, on `device`."""
        cfg = self.cfg
        masks = sample_multiblock_masks(n, self.grid, cfg.num_targets, cfg.target_scale, cfg.target_aspect,
                                        cfg.context_scale, self.min_context)
        return MultiBlockMasks(masks.context.to(device), masks.targets.to(device), masks.target_shape,
                               masks.context_shape)

    def predict(self, x: Tensor, masks: MultiBlockMasks) -> Tensor:
        """normalised crops (N, C, H, W) -> the predictor's outputs at the target blocks (N, M, T, D)."""
        tokens = self.backbone.embed(x)
        context = torch.gather(tokens, 1, masks.context.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        encoded = self.backbone.encode(context)[:, 1:]
        return self.predictor(encoded, masks.context, masks.targets)

    @torch.no_grad()
    def targets(self, x: Tensor, masks: MultiBlockMasks) -> tuple[Tensor, Tensor]:
        """normalised crops (N, C, H, W) -> (target encoder's tokens at the target blocks (N, M, T, D), before the
        loss's layer norm; its pooled features (N, D): the [cls] token, or the patch mean with global_pool)."""
        encoded = self.target_encoder.encode(self.target_encoder.embed(x))
        patches = encoded[:, 1:]
        n, blocks, t = masks.targets.shape
        index = masks.targets.reshape(n, blocks * t, 1).expand(-1, -1, patches.shape[-1])
        picked = torch.gather(patches, 1, index).view(n, blocks, t, -1)
        pooled = patches.mean(dim=1) if self.target_encoder.global_pool else encoded[:, 0]
        return picked, pooled

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        x = self.view(batch.x, precropped=batch.views is not None)
        masks = self.masks(x.shape[0], x.device)
        targets, features = self.targets(x, masks)
        predictions = self.predict(x, masks)
        loss = ijepa_loss(predictions.float(), targets.float(), self.cfg.loss)
        self.collapse.update(F.layer_norm(targets.float(), (targets.shape[-1],)).flatten(0, 2))
        patches = self.grid ** 2
        return {**self.with_probe("ijepa_loss", loss, features, batch.y),
                "ijepa/context_fraction": torch.tensor(masks.context.shape[1] / patches),
                "ijepa/target_fraction": torch.tensor(masks.targets.shape[2] / patches)}

    def epoch_metrics(self) -> dict[str, float]:
        return {**super().epoch_metrics(), **self.collapse.epoch_metrics(),
                "ijepa/target_momentum": self.current_momentum}
