"""Backbone registry: name -> constructor. Every backbone maps images (N, C, H, W) to (N, num_features).
Besides our own names, 'timm:NAME' and 'torchvision:NAME' build any model of those libraries (kwargs passed on)."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..errors import ConfigError
from .cnn import SmallCNN
from .resnet import ResNetBackbone, WideResNet
from .timm_backbone import PREFIX as TIMM_PREFIX, timm_backbone
from .torchvision_backbone import PREFIX as TORCHVISION_PREFIX, torchvision_backbone
from .vit import VisionTransformer

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": lambda in_channels, image_size, **kw: SmallCNN(in_channels, **kw),
    "resnet18": lambda in_channels, image_size, **kw: ResNetBackbone(18, in_channels, **kw),
    "resnet34": lambda in_channels, image_size, **kw: ResNetBackbone(34, in_channels, **kw),
    "resnet50": lambda in_channels, image_size, **kw: ResNetBackbone(50, in_channels, **kw),
    "wide_resnet28_2": lambda in_channels, image_size, **kw: WideResNet(28, 2, in_channels, **kw),
    "wide_resnet28_8": lambda in_channels, image_size, **kw: WideResNet(28, 8, in_channels, **kw),
    "wide_resnet": lambda in_channels, image_size, **kw: WideResNet(in_channels=in_channels, **kw),  # depth, widen
    "vit_tiny": lambda in_channels, image_size, **kw: VisionTransformer(
        image_size, in_channels=in_channels, **{"patch_size": 4, "dim": 192, "depth": 12, "heads": 3, **kw}),
    "vit_small": lambda in_channels, image_size, **kw: VisionTransformer(
        image_size, in_channels=in_channels, **{"patch_size": 4, "dim": 384, "depth": 12, "heads": 6, **kw}),
    "vit_base": lambda in_channels, image_size, **kw: VisionTransformer(
        image_size, in_channels=in_channels, **{"patch_size": 16, "dim": 768, "depth": 12, "heads": 12, **kw}),
}


def build_backbone(name: str, in_channels: int, image_size: int, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Construct a registered backbone; unknown names and bad kwargs raise ConfigError listing what is allowed."""
    if name.startswith(TIMM_PREFIX):
        return timm_backbone(name[len(TIMM_PREFIX):], in_channels, image_size, kwargs)
    if name.startswith(TORCHVISION_PREFIX):
        return torchvision_backbone(name[len(TORCHVISION_PREFIX):], in_channels, image_size, kwargs)
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r} (known: {', '.join(sorted(BACKBONES))}, "
                          f"or timm:NAME / torchvision:NAME)")
    try:
        return BACKBONES[name](in_channels, image_size, **(kwargs or {}))
    except TypeError as exc:
        raise ConfigError(f"backbone {name!r}: bad kwargs {kwargs}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"backbone {name!r}: {exc}") from None
