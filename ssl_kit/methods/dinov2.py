"""DINOv2 (Oquab et al. 2023): iBOT's [CLS] + masked-patch self-distillation on a ViT, with Sinkhorn-Knopp teacher
centring, the KoLeo regulariser and layer-wise lr decay.

The student sees 2 global crops (a share of them with block-masked patches replaced by the mask token) and
`local_crops` local crops; the EMA teacher (in eval mode) sees the 2 global crops unmasked. Loss =
DINO's cross-view [CLS] cross-entropy + `lambda_patch` × the masked-patch cross-entropy (the patch head is separate
or the [CLS] head, `shared_head`) + `koleo_weight` × Σ over the 2 global crops of KoLeo on the student's [CLS]
backbone features of that crop (per rank, as the reference). The teacher targets come from Sinkhorn-Knopp over the
global batch (`centering: sinkhorn_knopp`, 3 iterations: [CLS] tokens of both global crops together, masked patch
tokens together) or from DINO's softmax centring (`centering: centering`; the patch centre follows the teacher's
masked tokens). Masks follow DINOv2's collate: exactly int(2N · mask_prob) of the 2N global crops are masked, their
shares stratified over `mask_ratio`.

Parameter groups follow dinov2/utils/param_groups.py: backbone layer i at lr × layer_decay^(depth + 1 − i)
(embeddings and mask token 0, blocks 1..depth, final norm and heads depth + 1), the patch embedding × a further
patch_embed_lr_mult. The teacher backbone is what is evaluated and saved, as for DINO.

Gram anchoring (DINOv3, Siméoni et al. 2025; off by default, `gram_weight` 0): from step
round(`gram_start_fraction` × total steps) on, the loss adds `gram_weight` × `gram_loss` between the student's
patch features of the 2 global crops (masked as the student sees them) and those of the Gram teacher, a frozen copy
of the EMA teacher backbone on the same unmasked crops. The Gram teacher is reloaded from the EMA teacher at the start
step and every `gram_update_every` steps after it (before that step's forward); it is a submodule, so checkpoints
carry it."""
from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..common import distributed as dist
from ..data.loader import Batch
from ..losses import (KoLeoLoss, dinov2_cls_loss, dinov2_patch_loss, gram_loss, sinkhorn_knopp_centering,
                      softmax_centering)
from .base import Progress
from .ibot import IBOT, IBOTConfig, masks_with_counts
from .momentum import frozen_copy
from .param_groups import ParamGroup, layer_decay_groups, split_off
from .registry import register


class DINOv2Config(IBOTConfig):
    """iBOT's keys (heads, temperatures, EMA, multi-crop views, masking) with DINOv2's defaults, plus the teacher
    centring, KoLeo and layer-wise lr decay. Defaults: dinov2/configs/ssl_default_config.yaml (the ViT-L/16
    ImageNet-1k recipe, = train/vitl16_short.yaml), except the two loss choices of the released LVD-142M configs
    (train/vitl14.yaml, vitg14.yaml): `centering: sinkhorn_knopp` and a separate patch head. The prototype count
    stays the default config's 65536 (those configs: 131072 with a 384-wide bottleneck)."""

    method: Literal["dinov2"]

    recommended = {"optimizer": {"name": "adamw", "lr": 0.004, "lr_scaling": "sqrt", "base_batch_size": 1024, "weight_decay": 0.04, "betas": [0.9, 0.999]}, "schedule": {"name": "cosine", "warmup_epochs": 10, "min_lr_ratio": 0.00025, "weight_decay_end": 0.4}, "train": {"clip_grad_norm": 3.0}}
    recommended_source = ("DINOv2 (Oquab et al. 2023) reference dinov2/configs/ssl_default_config.yaml: AdamW β (0.9, 0.999), base lr 4e-3 × √(batch/1024) (scaling_rule sqrt_wrt_1024), weight decay 0.04 rising to 0.4 along a cosine (weight_decay_end 0.4; its ViT-g/14 config ends at 0.2), 10 warm-up epochs, cosine to min_lr 1e-6 (= 2.5e-4 × 4e-3), gradient clipping at norm 3.0")
    out_dim: int = Field(65536, ge=2, description="prototypes K of the [CLS] head (dino.head_n_prototypes)")
    patch_out_dim: int = Field(65536, ge=2, description="prototypes of the patch head (ibot.head_n_prototypes; "
                                                        "= out_dim when shared_head)")
    shared_head: bool = Field(False, description="one head for [CLS] and patch tokens; false: a separate patch "
                                                 "head (ibot.separate_head: true in vitl14/vitg14.yaml)")
    norm_last_layer: bool = Field(False, description="freeze the weight-norm magnitude of the last layer at 1 "
                                                     "(DINOv2's DINOHead trains it)")
    momentum: float = Field(0.992, ge=0, le=1, description="teacher EMA: cosine from this value to 1 "
                                                           "(teacher.momentum_teacher)")
    global_crop_scale: tuple[float, float] = Field((0.32, 1.0), description="crops.global_crops_scale")
    local_crops: int = Field(8, ge=0, description="crops.local_crops_number")
    local_crop_scale: tuple[float, float] = Field((0.05, 0.32), description="crops.local_crops_scale")
    mask_prob: float = Field(0.5, ge=0, le=1, description="share of the global crops that are masked: exactly "
                                                          "int(2N · mask_prob) per step "
                                                          "(ibot.mask_sample_probability)")
    mask_ratio: tuple[float, float] = Field((0.1, 0.5), description="masked share of a masked crop; the masked "
                                                                    "crops' shares are stratified over this range "
                                                                    "(ibot.mask_ratio_min_max)")
    centering: Literal["sinkhorn_knopp", "centering"] = Field(
        "sinkhorn_knopp", description="teacher targets: Sinkhorn-Knopp over the global batch, or DINO's softmax "
                                      "with a running centre (center_momentum) (train.centering)")
    sinkhorn_iterations: int = Field(3, ge=1, le=100, description="Sinkhorn-Knopp iterations (reference: 3)")
    koleo_weight: float = Field(0.1, ge=0, description="weight of the KoLeo term on the student's global [CLS] "
                                                       "features; 0 turns it off (dino.koleo_loss_weight)")
    layer_decay: float = Field(0.9, gt=0, le=1, description="layer-wise lr decay: block i trains at lr × "
                                                            "layer_decay^(depth + 1 − i) (optim.layerwise_decay)")
    patch_embed_lr_mult: float = Field(0.2, gt=0, le=1, description="a further lr factor of the patch embedding "
                                                                    "(optim.patch_embed_lr_mult)")
    gram_weight: float = Field(0.0, ge=0, description="weight of DINOv3's Gram anchoring loss; 0 turns it off "
                                                      "(DINOv3 paper: w_Gram 2; dinov3_vit7b16_gram_anchor.yaml: "
                                                      "gram.loss_weight_schedule end 2.0)")
    gram_start_fraction: float = Field(0.833, ge=0, lt=1, description="share of the run after which the Gram loss "
                                                                      "is on and the Gram teacher first loaded "
                                                                      "(DINOv3: after 1M of 1.2M iterations, ≈ 5/6)")
    gram_update_every: int = Field(10000, ge=1, description="steps between reloads of the Gram teacher from the EMA "
                                                            "teacher (DINOv3: every 10k iterations, "
                                                            "gram.update_frequency)")


def dinov2_mask_counts(n: int, length: int, ratio: tuple[float, float], prob: float) -> Tensor:
    """DINOv2's collate: masked-patch counts (n,) of n crops of `length` patches. Exactly int(n · prob) crops are
    masked; the k-th of them draws its share uniformly from the k-th of int(n · prob) equal bins of `ratio`
    (stratified, so every batch spans the range) and masks int(share · length) patches; the counts are shuffled."""
    masked = int(n * prob)
    edges = torch.linspace(ratio[0], ratio[1], masked + 1)
    shares = edges[:-1] + (edges[1:] - edges[:-1]) * torch.rand(masked)
    counts = torch.zeros(n, dtype=torch.long)
    counts[:masked] = (shares * length).long()
    return counts[torch.randperm(n)]


@register("dinov2", DINOv2Config)
class DINOv2(IBOT):
    """iBOT with Sinkhorn-Knopp (or softmax) teacher targets, KoLeo, DINOv2's masks and layer-wise lr decay."""

    metric_prefix = "dinov2"
    display_name = "DINOv2 [CLS]"

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        super().__init__(cfg, backbone, info)
        self.koleo = KoLeoLoss()
        if cfg.gram_weight:  # DINOv3's Gram teacher: a frozen, saved copy of the EMA teacher's backbone
            self.gram_teacher = frozen_copy(self.teacher_backbone).eval()

    def train(self, mode: bool = True) -> "DINOv2":
        super().train(mode)
        self.teacher_backbone.eval()  # the reference's teacher always runs in eval mode (no drop path)
        if self.cfg.gram_weight:
            self.gram_teacher.eval()  # as the reference's Gram teacher
        return self

    def parameter_groups(self) -> list[ParamGroup]:
        """The pretext groups (heads, probe) with the backbone split by layer: layer i at lr × backbone_lr_scale ×
        layer_decay^(depth + 1 − i); the mask token with the embeddings (layer 0); the patch embedding × a further
        patch_embed_lr_mult."""
        cfg, backbone = self.cfg, self.backbone
        groups = super().parameter_groups()
        base = cfg.optimizer.backbone_lr_scale
        for layer in layer_decay_groups(backbone, cfg.layer_decay, base):
            if layer.name == "layer0":
                layer = replace(layer, params=layer.params + [self.mask_token])
            groups = split_off(groups, layer)
        embedding_scale = base * cfg.layer_decay ** (backbone.depth + 1)
        patch_embed = [p for p in backbone.patch_embed.parameters() if p.requires_grad]
        return split_off(groups, ParamGroup("patch_embed", patch_embed, embedding_scale * cfg.patch_embed_lr_mult))

    def masks(self, n: int, device) -> Tensor:
        """Masks (n, L) of the n global crops, 1 = masked (DINOv2's counts, `masking` blocks or random patches)."""
        cfg, grid = self.cfg, self.backbone.grid
        counts = dinov2_mask_counts(n, grid * grid, cfg.mask_ratio, cfg.mask_prob)
        return masks_with_counts(counts, grid, cfg.masking, device)

    @torch.no_grad()
    def teacher_targets(self, teacher_cls: Tensor, teacher_patch: Tensor, cls_temp: float,
                        patch_temp: float) -> tuple[Tensor, Tensor]:
        """Teacher logits of the [CLS] tokens (2N, K) and of the masked patch tokens (M, K') -> target
        probabilities of the same shapes, by Sinkhorn-Knopp or by the running centres (which then take this step)."""
        cfg = self.cfg
        if cfg.centering == "sinkhorn_knopp":
            return (sinkhorn_knopp_centering(teacher_cls, cls_temp, cfg.sinkhorn_iterations),
                    sinkhorn_knopp_centering(teacher_patch, patch_temp, cfg.sinkhorn_iterations))
        targets = (softmax_centering(teacher_cls, self.center, cls_temp),
                   softmax_centering(teacher_patch, self.patch_center, patch_temp))
        self._update_center(teacher_cls)
        self._update_patch_center(teacher_patch)
        return targets

    @torch.no_grad()
    def _update_patch_center(self, teacher_patch: Tensor) -> None:
        """patch centre ← m·centre + (1 − m)·mean of the masked tokens' teacher logits (M, K') over the global
        batch (all ranks' tokens); left as it is when no token is masked anywhere."""
        sums = torch.cat([teacher_patch.sum(dim=0), teacher_patch.new_tensor([float(len(teacher_patch))])])
        sums = dist.all_reduce_sum(sums)  # (K' + 1,): the logit sums and the token count over all ranks
        count = float(sums[-1])
        if count:
            mean = (sums[:-1] / count).view_as(self.patch_center)
            self.patch_center.mul_(self.cfg.center_momentum).add_(mean * (1 - self.cfg.center_momentum))

    def gram_start_step(self, progress: Progress) -> int:
        """The first step with the Gram loss on: round(gram_start_fraction × total steps)."""
        return round(self.cfg.gram_start_fraction * progress.total_steps)

    def gram_on(self, progress: Progress) -> bool:
        """Whether this step adds the Gram loss: gram_weight > 0 and the start step reached."""
        return bool(self.cfg.gram_weight) and progress.step >= self.gram_start_step(progress)

    @torch.no_grad()
    def refresh_gram_teacher(self, progress: Progress) -> None:
        """Gram teacher ← EMA teacher backbone (parameters and buffers) at the start step and every
        gram_update_every steps after it; other steps leave it as it is. Called before the step's forward."""
        since = progress.step - self.gram_start_step(progress)
        if since < 0 or since % self.cfg.gram_update_every:
            return
        teacher = self.teacher_backbone.state_dict()
        for name, tensor in self.gram_teacher.state_dict().items():
            tensor.copy_(teacher[name])

    def gram_term(self, globals_: Tensor, student_tokens: Tensor) -> Tensor:
        """Gram anchoring on the 2 global crops globals_ (2N, C, H, W): `gram_loss` between the student's encoded
        patch tokens student_tokens[:, 1:] (2N, L, D) (masked crops as the student sees them) and the Gram teacher's
        on the unmasked crops. -> scalar."""
        with torch.no_grad():
            teacher_patches = self.gram_teacher.encode(self.gram_teacher.embed(globals_))[:, 1:]
        return gram_loss(student_tokens[:, 1:], teacher_patches)

    def koleo_term(self, global_cls: Tensor) -> Tensor:
        """Σ over the 2 global crops of KoLeo on the student's [CLS] features (2N, D) of that crop (not across the
        two crops of one image, as the reference). -> scalar."""
        return sum(self.koleo(crop) for crop in global_cls.chunk(2))

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        self._freeze_last_layer(progress)
        gram_on = self.gram_on(progress)
        if gram_on:
            self.refresh_gram_teacher(progress)
        views = self.augment_views(batch)
        globals_ = torch.cat(views[:2])
        mask = self.masks(globals_.shape[0], globals_.device)
        masked = mask > 0
        patch_head, teacher_patch_head = self.patch_heads()
        cls_temp, patch_temp = self.teacher_temperatures(progress)
        with torch.no_grad():
            teacher_tokens = self.teacher_backbone.encode(self.teacher_backbone.embed(globals_))
            teacher_cls = self.teacher_head(teacher_tokens[:, 0]).float()
            teacher_patch = teacher_patch_head(teacher_tokens[:, 1:][masked]).float()
            cls_targets, patch_targets = self.teacher_targets(teacher_cls, teacher_patch, cls_temp, patch_temp)
        student_tokens, student_logits = self.student_outputs(views, mask)
        student_patch = patch_head(student_tokens[:, 1:][masked]).float()
        teacher_probs = list(cls_targets.chunk(2))
        cls_loss = dinov2_cls_loss(student_logits, teacher_probs, cfg.student_temp)
        patch_loss = dinov2_patch_loss(student_patch, patch_targets, mask, cfg.student_temp)
        koleo = self.koleo_term(student_tokens[:, 0]) if cfg.koleo_weight else cls_loss.new_zeros(())
        self._loss_sum += cls_loss.detach()
        self._loss_count += 1
        features = self.pooled(teacher_tokens)
        self.collapse.update(features)
        probe = self.probe_loss(features, batch.y.repeat(2))
        loss = cls_loss + cfg.lambda_patch * patch_loss + cfg.koleo_weight * koleo
        stats = self._target_stats(student_logits[:2], cls_targets)
        if cfg.gram_weight:  # logged on every step of a run with Gram anchoring, 0 before its start
            gram = self.gram_term(globals_, student_tokens) if gram_on else cls_loss.new_zeros(())
            if gram_on:
                loss = loss + cfg.gram_weight * gram
            stats = {**stats, "gram_loss": gram.detach()}
        return {"loss": loss + probe, "dinov2_cls_loss": cls_loss.detach(), "dinov2_patch_loss": patch_loss.detach(),
                "koleo_loss": koleo.detach() / 2, "probe_loss": probe.detach(), "dinov2/mask_ratio": mask.mean(),
                **stats}
