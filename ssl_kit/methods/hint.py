"""FitNets hints (Romero et al. 2015) for the distillation methods: read an intermediate layer of the student and of a
teacher by module path (`features.2`, `layer3.1`), and a regressor that maps the student's hint to the teacher's
shape — a 1×1 conv + BatchNorm on feature maps (N, C, H, W), a linear layer on vectors (N, D) or tokens (N, L, D).
The loss itself is `ssl_kit.losses.hint_loss`."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..common.modes import eval_mode
from ..config import Strict
from ..errors import ConfigError


class HintConfig(Strict):
    """`hint:` block of a kd/dkd stage: MSE between regressor(student layer) and the teacher layer."""

    student_layer: str = Field(description="module path inside the student backbone, e.g. features.2")
    teacher_layer: str = Field(description="module path inside the teacher backbone, e.g. features.3")
    weight: float = Field(1.0, ge=0, description="weight of the hint loss beside the logit terms")
    teacher_index: int = Field(0, ge=0, description="which teacher of `teachers:` gives the hint (0: the first)")


def find_layer(backbone: nn.Module, path: str, where: str) -> nn.Module:
    """The sub-module at `path` (dotted, as in named_modules()); ConfigError naming `where` and listing the
    available paths otherwise."""
    modules = dict(backbone.named_modules())
    if path and path in modules:
        return modules[path]
    available = ", ".join(name for name in modules if name)
    raise ConfigError(f"{where}: no module {path!r} in the {getattr(backbone, 'arch', type(backbone).__name__)} "
                      f"backbone (available: {available})")


class FeatureTap:
    """Holds the output of one module during a forward pass (a clone, so a later in-place op such as ReLU(inplace)
    cannot change it under autograd)."""

    def __init__(self) -> None:
        self.value: Optional[Tensor] = None

    def _hook(self, module: nn.Module, inputs, output: Tensor) -> None:
        self.value = output.clone()

    @contextmanager
    def watching(self, module: nn.Module) -> Iterator["FeatureTap"]:
        """Record `module`'s output during the `with` block only (no hook left behind for EMA copies)."""
        handle = module.register_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()

    def take(self) -> Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("the hint layer was not reached by the forward pass")
        return value


def build_regressor(student_shape: torch.Size, teacher_shape: torch.Size, where: str) -> nn.Module:
    """FitNets regressor from a student hint of `student_shape` to `teacher_shape` (both without the batch dim):
    (C, H, W) -> 1×1 conv (no bias) + BatchNorm2d to the teacher's channels (spatial size matched afterwards by
    `Regressor.forward`); (D,) or (L, D) -> Linear on the last dim."""
    if len(student_shape) == 3 and len(teacher_shape) == 3:
        return nn.Sequential(nn.Conv2d(student_shape[0], teacher_shape[0], 1, bias=False),
                             nn.BatchNorm2d(teacher_shape[0]))
    if len(student_shape) == len(teacher_shape) and len(student_shape) in (1, 2) and \
            student_shape[:-1] == teacher_shape[:-1]:
        return nn.Linear(student_shape[-1], teacher_shape[-1])
    raise ConfigError(f"{where}: cannot regress the student's hint of shape {tuple(student_shape)} onto the teacher's "
                      f"{tuple(teacher_shape)} (both must be feature maps (C, H, W), vectors (D,) or token sequences "
                      f"(L, D) of the same length); pick layers of the same kind")


class Regressor(nn.Module):
    """student hint (N, ...) -> the teacher hint's shape (N, ...): the regressor, then (maps) a bilinear resize to
    the teacher's H × W when the two differ."""

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size, where: str) -> None:
        super().__init__()
        self.net = build_regressor(student_shape, teacher_shape, where)
        self.teacher_shape = tuple(teacher_shape)

    def forward(self, x: Tensor) -> Tensor:
        y = self.net(x)
        if y.ndim == 4 and tuple(y.shape[-2:]) != self.teacher_shape[-2:]:
            y = F.interpolate(y, size=self.teacher_shape[-2:], mode="bilinear", align_corners=False)
        return y


@torch.no_grad()
def probe_shape(backbone: nn.Module, layer: nn.Module, images: Tensor) -> torch.Size:
    """Output shape (without the batch dim) of `layer` when `backbone` runs on `images` (N, C, H, W), in eval mode
    (the training mode is restored)."""
    tap = FeatureTap()
    with eval_mode(backbone), tap.watching(layer):
        backbone(images)
    return tap.take().shape[1:]
