"""Any torchvision classification model as a trained backbone: `backbone: {name: torchvision:resnet50}`.

Nothing is downloaded (weights=None). The model's last nn.Linear (its classifier) becomes an identity, so the
backbone maps images (N, C, H, W) to the pooled pre-logits (N, num_features); for C != 3 the first convolution is
rebuilt with C input channels (same kernel, stride, padding). Kwargs go to torchvision.models.get_model.
"""
from __future__ import annotations

from typing import Any

import torch
import torchvision.models as tv_models
from torch import nn

from ..errors import ConfigError

PREFIX = "torchvision:"


def replace_classifier(model: nn.Module) -> tuple[str, int]:
    """Replace the last nn.Linear (the classifier) by an identity -> (its module path, its input width)."""
    last = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = module_name
    if last is None:
        raise ConfigError(f"torchvision model {type(model).__name__} has no final linear classifier to remove")
    parent_name, _, child = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    width = getattr(parent, child).in_features
    setattr(parent, child, nn.Identity())
    return last, width


def first_conv_name(model: nn.Module) -> str:
    """Module path of the first nn.Conv2d (the stem), e.g. 'conv1', 'features.0.0', 'conv_proj'."""
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return module_name
    raise ConfigError(f"torchvision model {type(model).__name__} has no convolution to adapt to the input channels")


def set_in_channels(model: nn.Module, in_channels: int) -> str:
    """Rebuild the first convolution with `in_channels` inputs (other settings kept) -> its module path."""
    name = first_conv_name(model)
    old = model.get_submodule(name)
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    old.groups, old.bias is not None, old.padding_mode)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return name


def list_torchvision_models() -> list[str]:
    return tv_models.list_models(module=tv_models)


def create_torchvision_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """torchvision.models.get_model(name, weights=None, **kwargs) with the classifier still in place."""
    known = list_torchvision_models()
    if name not in known:
        close = [k for k in known if name.split("_")[0] in k][:8]
        raise ConfigError(f"unknown torchvision model {name!r} (e.g. {', '.join(close or known[:8])})")
    if "weights" in kwargs:
        raise ConfigError(f"torchvision:{name}: 'weights' cannot be a backbone kwarg (nothing is downloaded); "
                          f"load local weights with init.checkpoint")
    try:
        return tv_models.get_model(name, weights=None, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"torchvision:{name}: bad kwargs {kwargs}: {exc}") from None


class TorchvisionBackbone(nn.Module):
    """images (N, C, H, W) -> features (N, num_features). State dict = torchvision's, keys prefixed 'model.', without
    the classifier. `classifier_name` / `stem_name` record what was replaced (the export rebuilds it that way)."""

    def __init__(self, name: str, in_channels: int = 3, **kwargs: Any) -> None:
        super().__init__()
        model = create_torchvision_model(name, kwargs)
        self.stem_name = set_in_channels(model, in_channels) if in_channels != 3 else None
        self.classifier_name, self.num_features = replace_classifier(model)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def torchvision_backbone(name: str, in_channels: int, image_size: int,
                         kwargs: dict[str, Any] | None = None) -> nn.Module:
    """'NAME' (without the 'torchvision:' prefix) -> TorchvisionBackbone. ViTs get image_size unless given."""
    kwargs = dict(kwargs or {})
    if name.startswith("vit_") and "image_size" not in kwargs:
        kwargs["image_size"] = image_size
    return TorchvisionBackbone(name, in_channels, **kwargs)
