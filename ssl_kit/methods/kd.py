"""Knowledge distillation with soft targets (Hinton et al. 2015): a frozen teacher (any backbone + head this package
saved) is distilled into a student of another architecture. loss = α · kd_loss(s, t, T) + (1 − α) · CE(s, y) on
labeled images, and α · kd_loss on unlabeled images when use_unlabeled is on — so a teacher trained with few labels
can be compressed using every unlabeled image."""
from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..common.metrics import predict
from ..config import StageBase, Strict
from ..data.augment import Normalize, random_translate_flip, to_unit_float
from ..data.loader import Batch
from ..errors import ConfigError
from ..losses import kd_loss
from ..models.registry import build_from_record
from .base import ClassifierMethod, Progress
from .registry import register


class TeacherConfig(Strict):
    checkpoint: Optional[str] = Field(None, description="backbone.pt (with its head), run dir or training checkpoint")
    from_stage: Optional[str] = Field(None, description="the backbone + head an earlier stage of this recipe produced")


class KDConfig(StageBase):
    """Hinton knowledge distillation: loss = alpha · KD(student ‖ teacher, T) + (1 − alpha) · CE(student, labels).
    alpha weighs the soft-target term (the convention of Hinton et al. and torchdistill; RepDistiller's 'alpha' is
    the CE weight instead)."""

    method: Literal["kd"]
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft-target (KD) term")
    kd_temperature: float = Field(4.0, gt=0, description="softens both distributions; T² rescales the gradient")
    use_unlabeled: bool = Field(False, description="also distil on unlabeled images (soft targets only)")
    mu: int = Field(3, ge=1, description="unlabeled batch = mu × labeled batch when use_unlabeled")
    cache_teacher_logits: bool = Field(False, description="teacher sees un-augmented images, logits computed once")

    @model_validator(mode="after")
    def _one_teacher(self) -> "KDConfig":
        if bool(self.teacher.checkpoint) == bool(self.teacher.from_stage):
            raise ValueError("give exactly one of teacher.checkpoint or teacher.from_stage")
        return self

    def stage_references(self) -> dict[str, Optional[str]]:
        return {**super().stage_references(), "teacher": self.teacher.from_stage}


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


@register("kd", KDConfig)
class KnowledgeDistillation(ClassifierMethod):

    @classmethod
    def wants_unlabeled(cls, cfg) -> bool:
        return cfg.use_unlabeled

    @classmethod
    def context_from(cls, cfg, data, load_record: Callable[[str], dict]) -> dict:
        if cfg.cache_teacher_logits and data.streamed:
            raise ConfigError(f"stages[{cfg.name}].cache_teacher_logits needs the training images in memory "
                              f"(data.storage=memory); on streamed data the teacher sees each step's view instead: "
                              f"set cache_teacher_logits=false")
        return {"teacher_record": load_record(cfg.teacher.from_stage or cfg.teacher.checkpoint),
                "train_images": None if data.streamed else data.train.images}

    def __init__(self, cfg, backbone: nn.Module, info, teacher_record: dict,
                 train_images: Optional[Tensor] = None) -> None:
        super().__init__(cfg, backbone, info)
        record = teacher_record
        self.teacher = Teacher(record)
        if record["head"]["num_classes"] != info.num_classes:
            raise ConfigError(f"stages[{cfg.name}]: the teacher predicts {record['head']['num_classes']} classes, "
                              f"the data has {info.num_classes}")
        self._train_images = train_images
        self.uses_unlabeled = cfg.use_unlabeled

    def unlabeled_ratio(self) -> int:
        return self.cfg.mu if self.cfg.use_unlabeled else 0
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
