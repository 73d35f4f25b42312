"""iBOT (Zhou et al. 2022): DINO's [CLS] self-distillation plus masked patch self-distillation on a ViT.

The student sees the 2 global crops with a random share of their patch tokens replaced by a learned mask token (a
ratio drawn per image from `mask_ratio`, for a `mask_prob` share of the images; blockwise or random patches) and the
local crops unmasked; the EMA teacher sees the 2 global crops unmasked. Loss = DINO's cross-view [CLS] loss
(`dino_loss`) + `lambda_patch` × the same-view patch loss on the masked tokens (`ibot_patch_loss`), each with its own
centre. The patch head is the [CLS] head (`shared_head`, the ViT-S/16 setting) or a separate one (`patch_out_dim`).

Collapse is watched as for DINO (teacher entropy, teacher/student KL, a loss stuck at ln K) and through
`ibot/embedding_std`: the per-dimension std of the teacher's normalised backbone embedding (see swav.py)."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..common import distributed as dist
from ..data.loader import Batch
from ..losses import dino_loss, ibot_patch_loss
from ..models.masking import block_masking
from .base import Progress, require_vit
from .collapse import EmbeddingStdWatch
from .dino import DINO, DINOConfig, DINOHead
from .momentum import frozen_copy
from .registry import register


class IBOTConfig(DINOConfig):
    """DINO's keys (head, temperatures, centre, EMA, multi-crop views) with iBOT's defaults, plus the masked patch
    objective. The patch teacher temperature follows the same warmup as the [CLS] one (from warmup_teacher_temp)."""

    method: Literal["ibot"]

    recommended = {"optimizer": {"name": "adamw", "lr": 0.0005, "lr_scaling": "linear", "base_batch_size": 256, "weight_decay": 0.04, "betas": [0.9, 0.999]}, "schedule": {"name": "cosine", "warmup_epochs": 10, "min_lr_ratio": 0.002, "weight_decay_end": 0.4}, "train": {"clip_grad_norm": 3.0}}
    recommended_source = ("iBOT (Zhou et al. 2022) reference main_ibot.py: AdamW, lr 5e-4 × batch/256, weight decay 0.04 rising to 0.4 along a cosine (weight_decay_end), 10 warm-up epochs, cosine to 1e-6, gradient clipping at norm 3.0")
    out_dim: int = Field(8192, ge=2, description="prototypes K of the [CLS] head")
    patch_out_dim: int = Field(8192, ge=2, description="prototypes of the patch head (= out_dim when shared_head)")
    shared_head: bool = Field(True, description="one head for [CLS] and patch tokens (iBOT's ViT-S/16 setting)")
    teacher_temp: float = Field(0.07, gt=0, description="[CLS] teacher temperature after warmup")
    teacher_patch_temp: float = Field(0.07, gt=0, description="patch teacher temperature after warmup")
    warmup_teacher_temp_epochs: float = Field(30, ge=0)
    local_crops: int = Field(10, ge=0)
    mask_ratio: tuple[float, float] = Field((0.1, 0.5), description="per-image masked share, uniform in this range")
    mask_prob: float = Field(0.5, ge=0, le=1, description="share of the global crops that are masked at all")
    masking: Literal["block", "random"] = Field("block", description="blockwise (BEiT) or random patches")
    lambda_patch: float = Field(1.0, ge=0, description="weight of the masked patch loss (iBOT's λ2)")

    @model_validator(mode="after")
    def _patch_keys(self) -> "IBOTConfig":
        low, high = self.mask_ratio
        if not 0 <= low <= high < 1:
            raise ValueError(f"mask_ratio must satisfy 0 <= low <= high < 1, got {self.mask_ratio}")
        if self.shared_head and self.patch_out_dim != self.out_dim and "patch_out_dim" in self.model_fields_set:
            raise ValueError(f"shared_head uses the [CLS] head for patches: patch_out_dim {self.patch_out_dim} "
                             f"must equal out_dim {self.out_dim} (or set shared_head: false)")
        return self


def ibot_masks(n: int, grid: int, ratio: tuple[float, float], prob: float, kind: str, device=None) -> Tensor:
    """Masks of n images of grid × grid patches -> (n, grid²) float, 1 = masked. Each image is masked with
    probability `prob`; a masked image gets round(r·L) masked patches, r ~ U(ratio), as blocks or at random."""
    length = grid * grid
    ratios = torch.empty(n).uniform_(*ratio) * (torch.rand(n) < prob)
    return masks_with_counts((ratios * length).round().long(), grid, kind, device)


def masks_with_counts(counts: Tensor, grid: int, kind: str, device=None) -> Tensor:
    """counts (n,): masked patches of each image -> masks (n, grid²) float, 1 = masked, exactly counts[i] patches in
    row i: BEiT blocks (`kind` "block") or patches at random ("random")."""
    length = grid * grid
    if kind == "block":
        rows = [block_masking(1, grid, float(c) / length)[1] if c else torch.zeros(1, length) for c in counts]
        return torch.cat(rows).to(device)
    rank = torch.rand(counts.shape[0], length).argsort(dim=1).argsort(dim=1)
    return (rank < counts[:, None]).float().to(device)


def masked_patch_logits(head: nn.Module, tokens: Tensor, mask: Tensor) -> Tensor:
    """The student's patch logits (M, L, K) at the masked positions of mask (M, L), 0 elsewhere: the head (row-wise,
    no batch statistics) runs on the masked tokens (M, L, D) only, since the patch loss reads no other position —
    the same loss and gradients as the head on every token, at the masked fraction of its cost."""
    rows = mask > 0
    picked = head(tokens[rows]).float()  # (masked tokens, K)
    out = picked.new_zeros(*mask.shape, picked.shape[-1])
    out[rows] = picked
    return out


@register("ibot", IBOTConfig)
class IBOT(DINO):
    """DINO on a ViT (teacher = EMA of student backbone + heads) with a mask token and a patch objective."""

    metric_prefix = "ibot"
    display_name = "iBOT [CLS]"

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        require_vit(cfg.name, backbone, self.display_name.split(" ")[0],  # iBOT, DINOv2
                    "the student's masked patches are replaced by a mask token")
        super().__init__(cfg, backbone, info)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.num_features))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        if not cfg.shared_head:
            self.patch_head_net = DINOHead(backbone.num_features, cfg.patch_out_dim, cfg.head_hidden_dim,
                                           cfg.bottleneck_dim, cfg.norm_last_layer)
            self.teacher_patch_head = frozen_copy(self.patch_head_net)
        self.register_buffer("patch_center", torch.zeros(1, 1, cfg.out_dim if cfg.shared_head else cfg.patch_out_dim))
        self.collapse = EmbeddingStdWatch(self.metric_prefix)

    def patch_heads(self) -> tuple[nn.Module, nn.Module]:
        """(student, teacher) patch heads: the [CLS] heads when shared_head."""
        if self.cfg.shared_head:
            return self.head_net, self.teacher_head
        return self.patch_head_net, self.teacher_patch_head

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = super().momentum_pairs()
        return pairs if self.cfg.shared_head else pairs + [(self.patch_head_net, self.teacher_patch_head)]

    def _freeze_last_layer(self, progress: Progress) -> None:
        super()._freeze_last_layer(progress)
        if not self.cfg.shared_head:
            frozen = progress.step < self.cfg.freeze_last_layer_epochs * progress.steps_per_epoch
            weight = self.patch_head_net.last_layer.parametrizations.weight
            weight.original1.requires_grad_(not frozen)
            if not self.cfg.norm_last_layer:
                weight.original0.requires_grad_(not frozen)

    def masked_tokens(self, x: Tensor, mask: Tensor) -> Tensor:
        """images (M, C, H, W), mask (M, L) -> student patch tokens (M, L, D): masked ones become mask token + pos."""
        tokens = self.backbone.embed(x)
        pos = self.backbone.pos_embed[:, 1:].to(tokens.dtype)
        return torch.where(mask.unsqueeze(-1) > 0, self.mask_token.to(tokens.dtype) + pos, tokens)

    def pooled(self, tokens: Tensor) -> Tensor:
        """Encoded tokens (M, 1 + L, D) -> the backbone's feature (M, D): cls, or mean of patches (global_pool)."""
        return tokens[:, 1:].mean(dim=1) if self.backbone.global_pool else tokens[:, 0]

    def teacher_temperatures(self, progress: Progress) -> tuple[float, float]:
        """([CLS], patch) teacher temperatures: both warm up from warmup_teacher_temp linearly."""
        cfg = self.cfg
        cls_temp = self.teacher_temperature(progress)
        if progress.step >= cfg.warmup_teacher_temp_epochs * progress.steps_per_epoch:
            return cls_temp, cfg.teacher_patch_temp
        fraction = progress.step / (cfg.warmup_teacher_temp_epochs * progress.steps_per_epoch)
        return cls_temp, cfg.warmup_teacher_temp + (cfg.teacher_patch_temp - cfg.warmup_teacher_temp) * fraction

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        self._freeze_last_layer(progress)
        views = self.augment_views(batch)
        globals_ = torch.cat(views[:2])
        patch_head, teacher_patch_head = self.patch_heads()
        mask = ibot_masks(globals_.shape[0], self.backbone.grid, cfg.mask_ratio, cfg.mask_prob, cfg.masking,
                          globals_.device)
        with torch.no_grad():
            teacher_tokens = self.teacher_backbone.encode(self.teacher_backbone.embed(globals_))
            teacher_cls = self.teacher_head(teacher_tokens[:, 0]).float()
            teacher_patch = teacher_patch_head(teacher_tokens[:, 1:]).float()
        student_tokens, student_logits = self.student_outputs(views, mask)
        student_patch = masked_patch_logits(patch_head, student_tokens[:, 1:], mask)
        cls_temp, patch_temp = self.teacher_temperatures(progress)
        teacher_out = list(teacher_cls.chunk(2))
        cls_loss = dino_loss(student_logits, teacher_out, self.center, cfg.student_temp, cls_temp)
        patch_loss = ibot_patch_loss(student_patch, teacher_patch, mask, self.patch_center, cfg.student_temp,
                                     patch_temp)
        stats = self._collapse_stats(student_logits[:2], teacher_out, cls_temp)
        self._update_centers(teacher_cls, teacher_patch)
        self._loss_sum += cls_loss.detach()
        self._loss_count += 1
        features = self.pooled(teacher_tokens)
        self.collapse.update(features)
        probe = self.probe_loss(features, batch.y.repeat(2))
        loss = cls_loss + cfg.lambda_patch * patch_loss
        return {"loss": loss + probe, "ibot_cls_loss": cls_loss.detach(), "ibot_patch_loss": patch_loss.detach(),
                "probe_loss": probe.detach(), "ibot/mask_ratio": mask.mean(), **stats}

    def student_outputs(self, views: list[Tensor], mask: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The student on every crop: the encoded tokens (2N, 1 + L, D) of the 2 global crops (views[0], views[1],
        each (N, C, H, W)) with the patches of `mask` (2N, L) replaced by the mask token, and the [CLS] head's logits
        of every crop, a list of (N, K): the 2 global crops, then the `local_crops` unmasked local ones."""
        tokens = self.backbone.encode(self.masked_tokens(torch.cat(views[:2]), mask))
        logits = list(self.head_net(tokens[:, 0]).float().chunk(2))
        if self.cfg.local_crops:
            local_cls = self.backbone.encode(self.backbone.embed(torch.cat(views[2:])))[:, 0]
            logits += list(self.head_net(local_cls).float().chunk(self.cfg.local_crops))
        return tokens, logits

    @torch.no_grad()
    def _update_centers(self, teacher_cls: Tensor, teacher_patch: Tensor) -> None:
        """Both centres ← m·centre + (1 − m)·mean teacher logits over the global batch ([CLS]: (2N, K); patches:
        (2N, L, K) averaged over images and tokens)."""
        self._update_center(teacher_cls)
        patch_mean = dist.all_reduce_mean(teacher_patch.mean(dim=(0, 1), keepdim=True))
        self.patch_center.mul_(self.cfg.center_momentum).add_(patch_mean * (1 - self.cfg.center_momentum))

    def epoch_metrics(self) -> dict[str, float]:
        """DINO's (the [CLS] loss, checked against ln K) and the embedding-std collapse watch."""
        return {**super().epoch_metrics(), **self.collapse.epoch_metrics()}
