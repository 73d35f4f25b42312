"""Shared base of the pretext-task methods (contrastive, DINO): an online linear probe on detached backbone
features, trained beside the pretext loss with its own learning rate and no weight decay, logged per epoch — how
users watch pretraining progress. The probe is also the classifier the test evaluation runs."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config import StageBase, Strict
from ..data.augment import random_resized_crop, to_unit_float
from ..data.crops import CropSpec
from ..data.loader import Batch
from ..data.needs import DataNeeds
from .base import Method
from .param_groups import ParamGroup


class OnlineProbeConfig(Strict):
    enabled: bool = True
    lr: float = Field(0.1, gt=0)


class PretextConfig(StageBase):
    """Keys every pretext method shares: the online linear probe watched during pretraining."""

    online_probe: OnlineProbeConfig = Field(default_factory=OnlineProbeConfig)


class ProbedClassifier(nn.Module):
    """backbone + online probe as one classifier: normalised images (N, C, H, W) -> logits (N, K)."""

    def __init__(self, backbone: nn.Module, probe: nn.Linear) -> None:
        super().__init__()
        self.backbone, self.probe = backbone, probe

    def forward(self, x: Tensor) -> Tensor:
        return self.probe(self.backbone(x))


def online_probe(features: int, classes: int) -> nn.Linear:
    """Linear F -> K; with no classes (a label-free source) an empty (0, F) layer that is never called or saved."""
    if classes:
        return nn.Linear(features, classes)
    with warnings.catch_warnings():  # torch warns that initialising a zero-element tensor does nothing: we know
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return nn.Linear(features, 0)


class PretextMethod(Method):
    """Holds `backbone` and `probe`; every other trainable parameter forms the 'projector' group (pretext heads)."""

    head_prefix = "probe."
    @classmethod
    def data_needs(cls, cfg) -> DataNeeds:
        """The pretext loss uses every image, labeled or not; the online probe learns from the labeled ones only."""
        return DataNeeds(labels=False)

    def __init__(self, cfg, backbone: nn.Module, info) -> None:
        super().__init__(cfg, info)
        self.backbone = backbone
        self.probe = online_probe(backbone.num_features, info.num_classes)
        self.register_buffer("_probe_correct", torch.zeros(()), persistent=False)
        self.register_buffer("_probe_seen", torch.zeros(()), persistent=False)

    @classmethod
    def ddp_find_unused_parameters(cls, cfg) -> bool:
        """The online probe is skipped for a batch without labelled images."""
        return cfg.online_probe.enabled

    def parameter_groups(self) -> list[ParamGroup]:
        probe_ids = {id(p) for p in self.probe.parameters()}
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        groups = [ParamGroup("backbone", [p for p in self.backbone.parameters() if p.requires_grad],
                             self.cfg.optimizer.backbone_lr_scale)]
        heads = [p for p in self.parameters() if p.requires_grad and id(p) not in probe_ids | backbone_ids]
        groups.append(ParamGroup("projector", heads))
        if self.cfg.online_probe.enabled:
            groups.append(ParamGroup("probe", list(self.probe.parameters()),
                                     self.cfg.online_probe.lr / self.cfg.optimizer.lr, weight_decay=False,
                                     extra={"lars": False}))
        return groups

    def probe_loss(self, features: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy of the online probe on detached features (no gradient reaches the backbone).
        features (N, F), labels (N,) with -1 for unknown."""
        known = labels >= 0
        if not self.cfg.online_probe.enabled or not bool(known.any()):
            return features.new_zeros(())
        logits = self.probe(features.detach()[known].float())
        with torch.no_grad():
            self._probe_correct += (logits.argmax(1) == labels[known]).sum()
            self._probe_seen += known.sum()
        return F.cross_entropy(logits, labels[known])

    def with_probe(self, name: str, loss: Tensor, features: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """The step's outputs: `loss` (the pretext loss `name`) plus the online probe's loss on detached `features`
        (N, F) with `labels` (N,). -> {"loss": total, name: pretext loss, "probe_loss": probe loss} (logged)."""
        probe = self.probe_loss(features, labels)
        return {"loss": loss + probe, name: loss.detach(), "probe_loss": probe.detach()}

    def classifier(self, ema: Optional[nn.Module] = None) -> Optional[nn.Module]:
        """backbone + online probe; None on a label-free source (no classes: nothing to classify)."""
        return ProbedClassifier(self.get_backbone(), self.probe) if self.probe.out_features else None

    def head(self) -> Optional[nn.Linear]:
        """The online probe, saved in backbone.pt; None when the data has no classes (features only)."""
        return self.probe if self.probe.out_features else None

    def epoch_metrics(self) -> dict[str, float]:
        seen = float(self._probe_seen)
        out = {"online_probe/train_top1": float(self._probe_correct) / seen} if seen else {}
        self._probe_correct.zero_()
        self._probe_seen.zero_()
        return out


class OneCropMethod(PretextMethod):
    """A pretext method trained on one random resized crop per image (`crop_scale` of its config, a flip where
    data.hflip allows): MAE, SimMIM, I-JEPA, CAPI."""

    def view(self, x: Tensor, precropped: bool = False) -> Tensor:
        """uint8 (N, C, H, W) -> normalised random resized crop (+ flip) (N, C, H, W). `precropped`: streamed data,
        whose workers already cut (and flipped) this crop (`stream_crop`); only the normalisation runs."""
        if precropped:
            return self.normalize(to_unit_float(x))
        return self.normalize(random_resized_crop(to_unit_float(x), tuple(self.cfg.crop_scale),
                                                  hflip=self.cfg.data.hflip))

    def stream_crop(self, image_size: int) -> CropSpec:
        """Streamed data: the workers cut the method's own random resized crop (crop_scale) and flip."""
        return CropSpec(image_size, tuple(self.cfg.crop_scale), flip=self.cfg.data.hflip)

    def preview_views(self, batch: Batch) -> dict[str, Tensor]:
        return {"crop": self.view(batch.x, precropped=batch.views is not None)}
