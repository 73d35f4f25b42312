"""Small CNN for 8–32 px inputs: three conv stages, global average pooling."""
from __future__ import annotations

import torch
from torch import nn


def norm_layer(kind: str, channels: int) -> nn.Module:
    """'batch' | 'group' (8 groups) | 'none'."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'group' or 'none', got {kind!r}")


class SmallCNN(nn.Module):
    """images (N, C, H, W) -> features (N, num_features). Widths w, 2w, 4w; pooling after stages 1 and 2."""

    def __init__(self, in_channels: int = 1, width: int = 32, norm: str = "batch") -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width]
        layers: list[nn.Module] = []
        channels = in_channels
        for stage, out in enumerate(widths):
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=norm == "none"), norm_layer(norm, out), nn.ReLU(inplace=True),
                       nn.Conv2d(out, out, 3, padding=1, bias=norm == "none"), norm_layer(norm, out), nn.ReLU(inplace=True)]
            if stage < len(widths) - 1:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)
