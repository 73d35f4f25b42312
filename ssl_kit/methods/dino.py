"""DINO (Caron et al. 2021): self-distillation with no labels. A student sees 2 global + N local crops, an EMA teacher
sees the 2 global crops; the student matches the teacher's centred, sharpened distribution over K prototypes.

Collapse is watched: the teacher's output entropy (→ 0: one prototype wins; → ln K: uniform) and the KL between
teacher and student are logged, and a warning fires when the loss sits at ln K."""
from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from ..data.augment import ContrastiveView
from ..data.loader import Batch
from ..engine import distributed as dist
from ..engine.ema import momentum_update
from ..engine.schedule import cosine_ramp
from ..losses import dino_loss
from .base import Progress
from .pretext import PretextMethod


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


class DINO(PretextMethod):
    backbone_prefix = "teacher_backbone."

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        super().__init__(cfg, backbone, info)
        self.head_net = DINOHead(backbone.num_features, cfg.out_dim, cfg.head_hidden_dim, cfg.bottleneck_dim,
                                 cfg.norm_last_layer)
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_head = copy.deepcopy(self.head_net)
        for p in list(self.teacher_backbone.parameters()) + list(self.teacher_head.parameters()):
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        size = info.image_size
        self.global_views = nn.ModuleList(
            ContrastiveView(self.normalize, cfg.views, cfg.data.hflip, crop_scale=cfg.global_crop_scale,
                            blur_prob=blur, solarize_prob=solarize)
            for blur, solarize in ((1.0 * (cfg.views.blur_prob > 0), 0.0), (0.1 * (cfg.views.blur_prob > 0), 0.2)))
        local_size = max(4, int(round(size * cfg.local_crop_size)))
        self.local_view = ContrastiveView(self.normalize, cfg.views, cfg.data.hflip, crop_scale=cfg.local_crop_scale,
                                          out_size=local_size)
        self.current_momentum = cfg.momentum
        self._warned_collapse = False
        self.register_buffer("_loss_sum", torch.zeros(()), persistent=False)
        self.register_buffer("_loss_count", torch.zeros(()), persistent=False)

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
        globals_ = torch.cat([view(batch.x) for view in self.global_views])
        with torch.no_grad():
            teacher_features = self.teacher_backbone(globals_)
            teacher_logits = self.teacher_head(teacher_features).float()
        student_logits = list(self.head_net(self.backbone(globals_)).float().chunk(2))
        if cfg.local_crops:
            locals_ = torch.cat([self.local_view(batch.x) for _ in range(cfg.local_crops)])
            student_logits += list(self.head_net(self.backbone(locals_)).float().chunk(cfg.local_crops))
        teacher_out = list(teacher_logits.chunk(2))
        temperature = self.teacher_temperature(progress)
        loss = dino_loss(student_logits, teacher_out, self.center, cfg.student_temp, temperature)
        self._update_center(teacher_logits)
        self._loss_sum += loss.detach()
        self._loss_count += 1
        probe = self.probe_loss(teacher_features, batch.y.repeat(2))
        stats = self._collapse_stats(student_logits[:2], teacher_out, temperature)
        return {"loss": loss + probe, "dino_loss": loss.detach(), "probe_loss": probe.detach(), **stats}

    @torch.no_grad()
    def _update_center(self, teacher_logits: Tensor) -> None:
        """center ← m·center + (1 − m)·mean of the teacher logits over the global batch (all ranks)."""
        batch_mean = dist.all_reduce_mean(teacher_logits.mean(dim=0, keepdim=True))
        self.center.mul_(self.cfg.center_momentum).add_(batch_mean * (1 - self.cfg.center_momentum))

    @torch.no_grad()
    def _collapse_stats(self, student: list[Tensor], teacher: list[Tensor], temperature: float) -> dict[str, Tensor]:
        p_t = F.softmax((torch.cat(teacher) - self.center) / temperature, dim=1)
        log_p_s = F.log_softmax(torch.cat(student) / self.cfg.student_temp, dim=1)
        entropy = -(p_t * torch.log(p_t.clamp_min(1e-12))).sum(1).mean()
        kl = (p_t * (torch.log(p_t.clamp_min(1e-12)) - log_p_s)).sum(1).mean()
        return {"dino/teacher_entropy": entropy, "dino/kl_teacher_student": kl}

    def after_optimizer_step(self, progress: Progress) -> None:
        self.current_momentum = cosine_ramp(self.cfg.momentum, 1.0, progress.step, progress.total_steps)
        momentum_update(self.teacher_backbone, self.backbone, self.current_momentum)
        momentum_update(self.teacher_head, self.head_net, self.current_momentum)

    def epoch_metrics(self) -> dict[str, float]:
        out = super().epoch_metrics()
        out["dino/teacher_momentum"] = self.current_momentum
        if float(self._loss_count):
            mean_loss = float(self._loss_sum / self._loss_count)
            out["dino/loss"] = mean_loss
            self.warn_if_collapsed(mean_loss)
        self._loss_sum.zero_()
        self._loss_count.zero_()
        return out

    def warn_if_collapsed(self, loss: float) -> None:
        """A loss that sits at ln K means the student predicts uniform prototypes: collapse."""
        if not self._warned_collapse and abs(loss - math.log(self.cfg.out_dim)) < 0.01 * math.log(self.cfg.out_dim):
            warnings.warn(f"DINO loss {loss:.4f} sits at ln K = {math.log(self.cfg.out_dim):.4f}: the outputs look "
                          f"collapsed to uniform; check teacher_temp, center_momentum and the learning rate")
            self._warned_collapse = True
