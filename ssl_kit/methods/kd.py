"""Knowledge distillation with soft targets (Hinton et al. 2015): frozen teachers (any backbone + head this package
saved) are distilled into a student of another architecture. loss = α · kd_loss(s, t, T) + (1 − α) · CE(s, y) on
labeled images, and α · kd_loss on unlabeled images when use_unlabeled is on — so a teacher trained with few labels
can be compressed using every unlabeled image.

Several teachers (`teachers:` list, each from a stage or a checkpoint, each its own architecture) give one soft
target: the weighted mean of their softened distributions (`multi_teacher_kd_loss`). A FitNets hint (`hint:` block)
adds the MSE between a regressor of a student layer and a teacher layer to the logit terms (methods/hint.py).
DKD (methods/dkd.py) reuses all of this with the decoupled loss."""
from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..common.metrics import predict
from ..config import StageBase, Strict
from ..data.needs import DataNeeds
from ..data.augment import random_translate_flip, to_unit_float
from ..data.views import Normalize
from ..data.loader import Batch
from ..errors import ConfigError
from ..losses import hint_loss, kd_loss, multi_teacher_kd_loss
from ..models.bounds import build_from_record
from .base import ClassifierMethod, Progress
from .hint import FeatureTap, HintConfig, Regressor, find_layer, probe_shape
from .registry import register


class TeacherConfig(Strict):
    checkpoint: Optional[str] = Field(None, description="backbone.pt (with its head), run dir or training checkpoint")
    from_stage: Optional[str] = Field(None, description="the backbone + head an earlier stage of this recipe produced")


class WeightedTeacherConfig(TeacherConfig):
    """One entry of `teachers:`."""

    weight: float = Field(1.0, ge=0, description="share of this teacher in the soft target (weights normalised)")


# RepDistiller's CIFAR-100 schedule (SGD 0.9, lr 0.05, weight decay 5e-4, × 0.1 at epochs 150/180/210 of 240), which
# DKD's mdistiller keeps: the `recommended` setting of kd and dkd.
KD_SGD = {"optimizer": {"name": "sgd", "lr": 0.05, "lr_scaling": "none", "weight_decay": 5e-4, "momentum": 0.9},
          "schedule": {"name": "multistep", "milestones": [0.625, 0.75, 0.875], "gamma": 0.1, "warmup_epochs": 0}}


class KDConfig(StageBase):
    """Hinton knowledge distillation: loss = alpha · KD(student ‖ teacher, T) + (1 − alpha) · CE(student, labels).
    alpha weighs the soft-target term (the convention of Hinton et al. and torchdistill; RepDistiller's 'alpha' is
    the CE weight instead)."""

    method: Literal["kd"]

    recommended = KD_SGD
    recommended_source = ("RepDistiller (Tian et al. 2020, train_student.py): SGD momentum 0.9, lr 0.05, weight decay 5e-4, lr × 0.1 at epochs 150/180/210 of 240")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    teachers: list[WeightedTeacherConfig] = Field(
        default_factory=list, description="several teachers (instead of `teacher`): weighted mean of soft targets")
    hint: Optional[HintConfig] = Field(None, description="FitNets hint: MSE of a regressed student layer to a teacher "
                                                         "layer, added to the logit terms")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft-target (KD) term")
    kd_temperature: float = Field(4.0, gt=0, description="softens both distributions; T² rescales the gradient")
    use_unlabeled: bool = Field(False, description="also distil on unlabeled images (soft targets only)")
    mu: int = Field(3, ge=1, description="unlabeled batch = mu × labeled batch when use_unlabeled")
    cache_teacher_logits: bool = Field(False, description="teacher sees un-augmented images, logits computed once")

    @model_validator(mode="after")
    def _teachers_given_once(self) -> "KDConfig":
        single = bool(self.teacher.checkpoint) or bool(self.teacher.from_stage)
        if self.teachers:
            if single:
                raise ValueError("give either teacher or teachers, not both")
            for i, entry in enumerate(self.teachers):
                if bool(entry.checkpoint) == bool(entry.from_stage):
                    raise ValueError(f"teachers[{i}]: give exactly one of checkpoint or from_stage")
            if sum(entry.weight for entry in self.teachers) <= 0:
                raise ValueError(f"teachers: the weights must not all be 0, got "
                                 f"{[entry.weight for entry in self.teachers]}")
        elif bool(self.teacher.checkpoint) == bool(self.teacher.from_stage):
            raise ValueError("give exactly one of teacher.checkpoint or teacher.from_stage")
        if self.hint is not None:
            if self.hint.teacher_index >= len(self.teacher_sources()):
                raise ValueError(f"hint.teacher_index {self.hint.teacher_index} is out of range: there are "
                                 f"{len(self.teacher_sources())} teacher(s)")
            if self.cache_teacher_logits:
                raise ValueError("hint needs the teacher's features of each augmented view: it cannot be combined "
                                 "with cache_teacher_logits")
        return self

    def teacher_sources(self) -> list[str]:
        """Stage name or checkpoint path of every teacher, in order."""
        entries = self.teachers or [self.teacher]
        return [entry.from_stage or entry.checkpoint for entry in entries]

    def teacher_weights(self) -> list[float]:
        return [entry.weight for entry in self.teachers] if self.teachers else [1.0]

    def stage_references(self) -> dict[str, Optional[str]]:
        if self.teachers:
            return {**super().stage_references(),
                    **{f"teachers[{i}]": entry.from_stage for i, entry in enumerate(self.teachers)}}
        return {**super().stage_references(), "teacher": self.teacher.from_stage}

    def unlabeled_ratio(self) -> int:
        return self.mu if self.use_unlabeled else 0


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

    def inputs(self, unit_images: Tensor) -> Tensor:
        """unit images (N, C, H, W) in [0, 1] -> the teacher's own input format (channels, size, normalisation)."""
        x = unit_images
        if x.shape[1] != self.channels:
            x = x.mean(1, keepdim=True) if self.channels == 1 else x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return self.normalize(x)

    @torch.no_grad()
    def forward(self, unit_images: Tensor) -> Tensor:
        return self.head(self.backbone(self.inputs(unit_images))).float()


@register("kd", KDConfig)
class KnowledgeDistillation(ClassifierMethod):

    @classmethod
    def data_needs(cls, cfg) -> DataNeeds:
        """Labeled batches; with use_unlabeled, μ× unlabeled images the teacher labels too."""
        mu = cfg.unlabeled_ratio()
        return DataNeeds(unlabeled=mu > 0, unlabeled_ratio=mu)

    @classmethod
    def context_from(cls, cfg, data, load_record: Callable[[str], dict]) -> dict:
        train_images = data.images_in_memory()
        if cfg.cache_teacher_logits and train_images is None:
            raise ConfigError(f"stages[{cfg.name}].cache_teacher_logits needs the training images in memory "
                              f"(data.storage=memory); on streamed data the teacher sees each step's view instead: "
                              f"set cache_teacher_logits=false")
        return {"teacher_records": [load_record(source) for source in cfg.teacher_sources()],
                "train_images": train_images}

    def __init__(self, cfg, backbone: nn.Module, info, teacher_records: list[dict],
                 train_images: Optional[Tensor] = None) -> None:
        super().__init__(cfg, backbone, info)
        self.teachers = nn.ModuleList()
        for i, record in enumerate(teacher_records):
            teacher = Teacher(record)
            if record["head"]["num_classes"] != info.num_classes:
                which = "teacher" if len(teacher_records) == 1 else f"teachers[{i}]"
                raise ConfigError(f"stages[{cfg.name}].{which}: the teacher predicts {record['head']['num_classes']} "
                                  f"classes, the data has {info.num_classes}")
            self.teachers.append(teacher)
        self.teacher_weights = cfg.teacher_weights()
        self._train_images = train_images
        self.register_buffer("cached_logits", torch.empty(0), persistent=False)
        self.regressor: Optional[Regressor] = None
        if cfg.hint is not None:
            self._build_hint(cfg, info)

    @property
    def teacher(self) -> Teacher:
        """The first (or only) teacher."""
        return self.teachers[0]

    def _build_hint(self, cfg, info) -> None:
        hint, where = cfg.hint, f"stages[{cfg.name}].hint"
        teacher = self.teachers[hint.teacher_index]
        student_layer = find_layer(self.net.backbone, hint.student_layer, f"{where}.student_layer")
        teacher_layer = find_layer(teacher.backbone, hint.teacher_layer, f"{where}.teacher_layer")
        unit = torch.zeros(2, info.channels, info.image_size, info.image_size)
        student_shape = probe_shape(self.net.backbone, student_layer, self.normalize(unit))
        teacher_shape = probe_shape(teacher.backbone, teacher_layer, teacher.inputs(unit))
        self.regressor = Regressor(student_shape, teacher_shape, where)


    def _teacher_logits(self, unit_view: Tensor, index: Tensor) -> list[Tensor]:
        """Each teacher's logits (N, K) of the same augmented view, or of the clean image from a cache computed
        once."""
        if not self.cfg.cache_teacher_logits:
            return [teacher(unit_view) for teacher in self.teachers]
        if self.cached_logits.numel() == 0:
            self.cached_logits = torch.stack([predict(teacher, self._train_images, to_unit_float, unit_view.device)
                                              for teacher in self.teachers]).to(unit_view.device)
        return list(self.cached_logits[:, index])

    def _views(self, x: Tensor) -> Tensor:
        """uint8 (N, C, H, W) -> the weak view as unit floats (teacher and student normalise it their own way)."""
        return random_translate_flip(to_unit_float(x), self.cfg.data.translate, self.cfg.data.hflip)

    def _forward(self, unit_view: Tensor, index: Tensor) -> tuple[Tensor, list[Tensor], Optional[Tensor]]:
        """Student logits (N, K), each teacher's logits, and the hint loss (None without a hint block)."""
        if self.regressor is None:
            return self.net(self.normalize(unit_view)).float(), self._teacher_logits(unit_view, index), None
        hint_cfg = self.cfg.hint
        student_layer = self.net.backbone.get_submodule(hint_cfg.student_layer)  # looked up by path: no second
        teacher_layer = self.teachers[hint_cfg.teacher_index].backbone.get_submodule(hint_cfg.teacher_layer)  # owner
        student_tap, teacher_tap = FeatureTap(), FeatureTap()
        with student_tap.watching(student_layer):
            logits = self.net(self.normalize(unit_view)).float()
        with teacher_tap.watching(teacher_layer):
            teacher_logits = self._teacher_logits(unit_view, index)
        hint = hint_loss(self.regressor(student_tap.take()), teacher_tap.take())
        return logits, teacher_logits, hint

    def soft_loss(self, student_logits: Tensor, teacher_logits: list[Tensor], targets: Optional[Tensor]) -> Tensor:
        """The logit distillation term. KD: Hinton's soft targets (the weighted mean over teachers); `targets`
        (true labels, None on unlabeled images) are DKD's business."""
        if len(teacher_logits) == 1:
            return kd_loss(student_logits, teacher_logits[0], self.cfg.kd_temperature)
        return multi_teacher_kd_loss(student_logits, teacher_logits, self.teacher_weights, self.cfg.kd_temperature)

    def loss_weights(self, progress: Progress) -> tuple[float, float]:
        """(weight of CE on labels, weight of the soft term) at this step: KD's (1 − α, α)."""
        return 1.0 - self.cfg.alpha, self.cfg.alpha

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        ce_weight, soft_weight = self.loss_weights(progress)
        logits, teacher_logits, hint = self._forward(self._views(batch.x), batch.x_index)
        soft = self.soft_loss(logits, teacher_logits, batch.y)
        hard = F.cross_entropy(logits, batch.y)
        loss = soft_weight * soft + ce_weight * hard
        out = {"kd_loss": soft.detach(), "ce_loss": hard.detach()}
        hints = [] if hint is None else [hint]
        if cfg.use_unlabeled and batch.u is not None:
            logits_u, teacher_u, hint_u = self._forward(self._views(batch.u), batch.u_image_index)
            soft_u = self.soft_loss(logits_u, teacher_u, None)
            loss = loss + soft_weight * soft_u
            out["kd_unlabeled_loss"] = soft_u.detach()
            hints += [] if hint_u is None else [hint_u]
        if hints:
            hint_total = sum(hints) / len(hints)
            loss = loss + cfg.hint.weight * hint_total
            out["hint_loss"] = hint_total.detach()
        out["loss"] = loss
        return out
