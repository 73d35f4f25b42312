"""DINO (Caron et al. 2021): self-distillation with no labels. A student sees 2 global + N local crops, an EMA teacher
sees the 2 global crops; the student matches the teacher's centred, sharpened distribution over K prototypes.

Collapse is watched: the teacher's output entropy (→ 0: one prototype wins; → ln K: uniform) and the KL between
teacher and student are logged, and a warning fires when the loss sits at ln K."""
from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from ..common import distributed as dist
from ..config import ViewsConfig
from ..data.views import ContrastiveView
from ..data.loader import Batch
from ..losses import dino_loss
from .base import Progress
from .momentum import frozen_copy
from .pretext import PretextConfig, PretextMethod
from .registry import register


class DINOConfig(PretextConfig):
    """DINO self-distillation: EMA teacher, centering, sharpening, multi-crop. The view keys follow lightly's
    DINOTransform: `gaussian_blur` = blur probability of (global view 1, global view 2, local views),
    `solarization_prob` for global view 2; `views` gives the crop-independent colour strengths."""

    method: Literal["dino"]

    recommended = {"optimizer": {"name": "adamw", "lr": 0.0005, "lr_scaling": "linear", "base_batch_size": 256, "weight_decay": 0.04, "betas": [0.9, 0.999]}, "schedule": {"name": "cosine", "warmup_epochs": 10, "min_lr_ratio": 0.002, "weight_decay_end": 0.4}, "train": {"clip_grad_norm": 3.0}}
    recommended_source = ("DINO (Caron et al. 2021) reference main_dino.py: AdamW, lr 5e-4 × batch/256, weight decay 0.04 rising to 0.4 along a cosine (weight_decay_end), 10 warm-up epochs, cosine to 1e-6, gradient clipping at norm 3.0")
    out_dim: int = Field(4096, ge=2, description="prototypes K of the DINO head")
    head_hidden_dim: int = Field(2048, ge=1)
    bottleneck_dim: int = Field(256, ge=1)
    norm_last_layer: bool = Field(True, description="freeze the weight-norm magnitude of the last layer at 1")
    student_temp: float = Field(0.1, gt=0)
    teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp_epochs: float = Field(0, ge=0)
    center_momentum: float = Field(0.9, ge=0, lt=1)
    momentum: float = Field(0.996, ge=0, le=1, description="teacher EMA: cosine from this value to 1")
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crops: int = Field(6, ge=0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    local_crop_size: float = Field(0.43, gt=0, le=1, description="local crop side as a fraction of image_size")
    gaussian_blur: tuple[float, float, float] = Field(
        (1.0, 0.1, 0.5), description="blur probability of global view 1, global view 2, each local view (DINO's)")
    solarization_prob: float = Field(0.2, ge=0, le=1, description="solarize probability of global view 2")
    freeze_last_layer_epochs: float = Field(1, ge=0)
    views: ViewsConfig = Field(default_factory=ViewsConfig)

    @model_validator(mode="after")
    def _views_without_blur(self) -> "DINOConfig":
        self.views.refuse_per_view_keys("DINO", "gaussian_blur, solarization_prob, global_crop_scale and "
                                                "local_crop_scale")
        if not all(0 <= p <= 1 for p in self.gaussian_blur):
            raise ValueError(f"gaussian_blur probabilities must be in [0, 1], got {self.gaussian_blur}")
        return self


class DINOHead(nn.Module):
    """MLP (3 layers, GELU) -> bottleneck -> L2 normalise -> weight-normalised linear to K prototypes.
    features (N, F) -> logits (N, K)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, bottleneck: int, norm_last_layer: bool) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


@register("dino", DINOConfig)
class DINO(PretextMethod):
    backbone_prefix = "teacher_backbone."
    metric_prefix = "dino"  # logged as <metric_prefix>/teacher_entropy, ... (subclasses log under their own name)
    display_name = "DINO"  # names the loss in the collapse warning

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        super().__init__(cfg, backbone, info)
        self.head_net = DINOHead(backbone.num_features, cfg.out_dim, cfg.head_hidden_dim, cfg.bottleneck_dim,
                                 cfg.norm_last_layer)
        self.teacher_backbone = frozen_copy(backbone)
        self.teacher_head = frozen_copy(self.head_net)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        blur1, blur2, blur_local = cfg.gaussian_blur
        self.global_views = nn.ModuleList([
            ContrastiveView.from_config(self.normalize, cfg.views, cfg.data.hflip, crop_scale=cfg.global_crop_scale,
                                        blur_prob=blur1, solarize_prob=0.0),
            ContrastiveView.from_config(self.normalize, cfg.views, cfg.data.hflip, crop_scale=cfg.global_crop_scale,
                                        blur_prob=blur2, solarize_prob=cfg.solarization_prob)])
        local_size = max(4, int(round(info.image_size * cfg.local_crop_size)))
        self.local_view = ContrastiveView.from_config(self.normalize, cfg.views, cfg.data.hflip,
                                                      crop_scale=cfg.local_crop_scale, out_size=local_size,
                                                      blur_prob=blur_local)
        self.current_momentum = cfg.momentum
        self._warned_collapse = False
        self.register_buffer("_loss_sum", torch.zeros(()), persistent=False)
        self.register_buffer("_loss_count", torch.zeros(()), persistent=False)

    @classmethod
    def ddp_find_unused_parameters(cls, cfg) -> bool:
        """The head's last layer is frozen (no gradient) for the first freeze_last_layer_epochs."""
        return True

    def view_list(self) -> list[nn.Module]:
        """2 global views, then `local_crops` local views."""
        return [*self.global_views, *[self.local_view] * self.cfg.local_crops]

    def get_backbone(self) -> nn.Module:
        """The teacher's backbone: what DINO evaluates and saves."""
        return self.teacher_backbone

    def head_modules(self) -> list[nn.Module]:
        return [self.probe]

    def train(self, mode: bool = True) -> "DINO":
        super().train(mode)
        self.teacher_backbone.train(mode)  # BN statistics of the teacher follow its inputs, as in the reference
        return self

    def teacher_temperature(self, progress: Progress) -> float:
        """Linear warmup from warmup_teacher_temp to teacher_temp over warmup_teacher_temp_epochs."""
        cfg = self.cfg
        warm_steps = cfg.warmup_teacher_temp_epochs * progress.steps_per_epoch
        if progress.step >= warm_steps:
            return cfg.teacher_temp
        return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * progress.step / warm_steps

    def _freeze_last_layer(self, progress: Progress) -> None:
        frozen = progress.step < self.cfg.freeze_last_layer_epochs * progress.steps_per_epoch
        weight = self.head_net.last_layer.parametrizations.weight
        weight.original1.requires_grad_(not frozen)
        if not self.cfg.norm_last_layer:
            weight.original0.requires_grad_(not frozen)

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        self._freeze_last_layer(progress)
        views = self.augment_views(batch)
        globals_ = torch.cat(views[:2])
        with torch.no_grad():
            teacher_features = self.teacher_backbone(globals_)
            teacher_logits = self.teacher_head(teacher_features).float()
        student_logits = list(self.head_net(self.backbone(globals_)).float().chunk(2))
        if cfg.local_crops:
            locals_ = torch.cat(views[2:])
            student_logits += list(self.head_net(self.backbone(locals_)).float().chunk(cfg.local_crops))
        teacher_out = list(teacher_logits.chunk(2))
        temperature = self.teacher_temperature(progress)
        loss = dino_loss(student_logits, teacher_out, self.center, cfg.student_temp, temperature)
        self._update_center(teacher_logits)
        self._loss_sum += loss.detach()
        self._loss_count += 1
        stats = self._collapse_stats(student_logits[:2], teacher_out, temperature)
        return {**self.with_probe("dino_loss", loss, teacher_features, batch.y.repeat(2)), **stats}

    @torch.no_grad()
    def _update_center(self, teacher_logits: Tensor) -> None:
        """center ← m·center + (1 − m)·mean of the teacher logits over the global batch (all ranks)."""
        batch_mean = dist.all_reduce_mean(teacher_logits.mean(dim=0, keepdim=True))
        self.center.mul_(self.cfg.center_momentum).add_(batch_mean * (1 - self.cfg.center_momentum))

    @torch.no_grad()
    def _collapse_stats(self, student: list[Tensor], teacher: list[Tensor], temperature: float) -> dict[str, Tensor]:
        """Collapse statistics of the centred, sharpened teacher logits (lists of (N, K))."""
        p_t = F.softmax((torch.cat(teacher) - self.center) / temperature, dim=1)
        return self._target_stats(student, p_t)

    @torch.no_grad()
    def _target_stats(self, student: list[Tensor], teacher_probs: Tensor) -> dict[str, Tensor]:
        """Teacher target entropy (→ 0: one prototype wins; → ln K: uniform) and KL(teacher ‖ student), averaged
        over rows. student: list of (N, K) logits; teacher_probs: (N · len(student), K) target probabilities."""
        p_t = teacher_probs
        log_p_s = F.log_softmax(torch.cat(student) / self.cfg.student_temp, dim=1)
        entropy = -(p_t * torch.log(p_t.clamp_min(1e-12))).sum(1).mean()
        kl = (p_t * (torch.log(p_t.clamp_min(1e-12)) - log_p_s)).sum(1).mean()
        prefix = self.metric_prefix
        return {f"{prefix}/teacher_entropy": entropy, f"{prefix}/kl_teacher_student": kl}

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.teacher_backbone), (self.head_net, self.teacher_head)]

    def epoch_metrics(self) -> dict[str, float]:
        out = super().epoch_metrics()
        out[f"{self.metric_prefix}/teacher_momentum"] = self.current_momentum
        if float(self._loss_count):
            mean_loss = float(self._loss_sum / self._loss_count)
            out[f"{self.metric_prefix}/loss"] = mean_loss
            self.warn_if_collapsed(mean_loss)
        self._loss_sum.zero_()
        self._loss_count.zero_()
        return out

    def warn_if_collapsed(self, loss: float) -> None:
        """A loss that sits at ln K means the student predicts uniform prototypes: collapse."""
        if not self._warned_collapse and abs(loss - math.log(self.cfg.out_dim)) < 0.01 * math.log(self.cfg.out_dim):
            warnings.warn(f"{self.display_name} loss {loss:.4f} sits at ln K = {math.log(self.cfg.out_dim):.4f}: the "
                          f"outputs look collapsed to uniform; check teacher_temp, center_momentum and the learning "
                          f"rate")
            self._warned_collapse = True
