"""Knowledge distillation with soft targets (Hinton et al. 2015): a frozen teacher (any backbone + head this package
saved) is distilled into a student of another architecture. loss = α · kd_loss(s, t, T) + (1 − α) · CE(s, y) on
labeled images, and α · kd_loss on unlabeled images when use_unlabeled is on — so a teacher trained with few labels
can be compressed using every unlabeled image."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.augment import Normalize, random_translate_flip, to_unit_float
from ..data.loader import Batch
from ..engine.checkpoint import build_from_record, resolve_checkpoint
from ..errors import ConfigError
from ..eval.metrics import predict
from ..losses import kd_loss
from .base import ClassifierMethod, Progress


class Teacher(nn.Module):
    """A frozen backbone + linear head rebuilt from a backbone record, fed images converted to its own input format
    (size, channels, normalisation). unit images (N, C, H, W) in [0, 1] -> logits (N, K)."""

    def __init__(self, record: dict) -> None:
        super().__init__()
        if "head" not in record:
            raise ConfigError("the teacher checkpoint has no classification head: train the teacher with labels "
                              "(a supervised/fixmatch/kd stage) or use its run's backbone.pt")
        self.backbone = build_from_record(record)
        self.head = nn.Linear(self.backbone.num_features, record["head"]["num_classes"])
        self.head.load_state_dict(record["head"]["state_dict"])
        info = record["data"]
        self.size, self.channels = info["image_size"], info["channels"]
        self.normalize = Normalize(info["mean"], info["std"])
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # always in eval mode

    @torch.no_grad()
    def forward(self, unit_images: Tensor) -> Tensor:
        x = unit_images
        if x.shape[1] != self.channels:
            x = x.mean(1, keepdim=True) if self.channels == 1 else x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return self.head(self.backbone(self.normalize(x))).float()


class KnowledgeDistillation(ClassifierMethod):

    @classmethod
    def wants_unlabeled(cls, cfg) -> bool:
        return cfg.use_unlabeled

    @classmethod
    def context_from(cls, cfg, data, stage_backbones: dict) -> dict:
        source = cfg.teacher.checkpoint or stage_backbones[cfg.teacher.from_stage]
        return {"teacher_record": resolve_checkpoint(source), "train_images": data.train.images}

    def __init__(self, cfg, backbone: nn.Module, info, teacher_record: Optional[dict] = None,
                 train_images: Optional[Tensor] = None) -> None:
        super().__init__(cfg, backbone, info)
        record = teacher_record if teacher_record is not None else resolve_checkpoint(cfg.teacher.checkpoint)
        self.teacher = Teacher(record)
        if record["head"]["num_classes"] != info.num_classes:
            raise ConfigError(f"stages[{cfg.name}]: the teacher predicts {record['head']['num_classes']} classes, "
                              f"the data has {info.num_classes}")
        self._train_images = train_images
        self.uses_unlabeled = cfg.use_unlabeled
        self.register_buffer("cached_logits", torch.empty(0), persistent=False)

    def _teacher_logits(self, unit_view: Tensor, index: Tensor) -> Tensor:
        """Teacher logits of the same augmented view, or of the clean image from a cache computed once."""
        if not self.cfg.cache_teacher_logits:
            return self.teacher(unit_view)
        if self.cached_logits.numel() == 0:
            images = self._train_images
            self.cached_logits = predict(self.teacher, images, to_unit_float, unit_view.device).to(unit_view.device)
        return self.cached_logits[index]

    def _views(self, x: Tensor) -> Tensor:
        """uint8 (N, C, H, W) -> the weak view as unit floats (teacher and student normalise it their own way)."""
        return random_translate_flip(to_unit_float(x), self.cfg.data.translate, self.cfg.data.hflip)

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        x = self._views(batch.x)
        logits = self.net(self.normalize(x))
        soft = kd_loss(logits.float(), self._teacher_logits(x, batch.x_index), cfg.kd_temperature)
        hard = F.cross_entropy(logits.float(), batch.y)
        loss = cfg.alpha * soft + (1 - cfg.alpha) * hard
        out = {"kd_loss": soft.detach(), "ce_loss": hard.detach()}
        if cfg.use_unlabeled and batch.u is not None:
            u = self._views(batch.u)
            soft_u = kd_loss(self.net(self.normalize(u)).float(), self._teacher_logits(u, batch.u_image_index),
                             cfg.kd_temperature)
            loss = loss + cfg.alpha * soft_u
            out["kd_unlabeled_loss"] = soft_u.detach()
        out["loss"] = loss
        return out
