"""torchvision ResNets as backbones (any input channels, optional small-image stem) and WideResNet-28-k."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn


class ResNetBackbone(nn.Module):
    """images (N, C, H, W) -> features (N, 512 or 2048). small_stem: 3×3 stride-1 conv, no max-pool (CIFAR-style)."""

    def __init__(self, depth: int = 18, in_channels: int = 3, small_stem: bool = True, zero_init_residual: bool = True) -> None:
        super().__init__()
        builders = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34, 50: torchvision.models.resnet50}
        if depth not in builders:
            raise ValueError(f"ResNet depth must be one of {sorted(builders)}, got {depth}")
        net = builders[depth](weights=None, zero_init_residual=zero_init_residual)
        if small_stem:
            net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.num_features = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """images (N, C, H, W) -> last stage's map (N, num_features, H / stride, W / stride) before pooling."""
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))

    @property
    def stride(self) -> int:
        """Total downsampling of feature_map: 8 with the small stem, 32 with the ImageNet stem."""
        return 8 if isinstance(self.net.maxpool, nn.Identity) and self.net.conv1.stride == (1, 1) else 32


class _WideBlock(nn.Module):
    """Pre-activation wide basic block (BN-LeakyReLU-conv ×2), as in the FixMatch code base."""

    def __init__(self, cin: int, cout: int, stride: int, activate_before_residual: bool) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, momentum=0.001)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=0.001)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        self.activate_before_residual = activate_before_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.leaky_relu(self.bn1(x), 0.1)
        if self.shortcut is None:
            residual, conv_in = x, activated
        elif self.activate_before_residual:
            residual, conv_in = activated, activated
        else:  # the reference feeds the raw input to both branches here
            residual, conv_in = x, x
        y = self.conv2(F.leaky_relu(self.bn2(self.conv1(conv_in)), 0.1))
        return y + (residual if self.shortcut is None else self.shortcut(residual))


class WideResNet(nn.Module):
    """WRN-depth-k (depth = 6n + 4). images (N, C, 32, 32) -> features (N, 64k)."""

    def __init__(self, depth: int = 28, widen: int = 2, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks = []
        cin = widths[0]
        for group, (cout, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
            for i in range(n):
                blocks.append(_WideBlock(cin, cout, stride if i == 0 else 1, activate_before_residual=group == 0 and i == 0))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin, momentum=0.001)
        self.num_features = cin
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.bn(self.blocks(self.stem(x))), 0.1)
        return F.adaptive_avg_pool2d(y, 1).flatten(1)
