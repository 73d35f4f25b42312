"""Heads: linear classifier, MLP projector/predictor, and their initialisation options."""
from __future__ import annotations

import torch
from torch import nn


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 2, last_bn: bool = False) -> nn.Sequential:
    """Linear-BN-ReLU × (layers − 1), then Linear (+ affine-free BN when last_bn). (N, in) -> (N, out)."""
    modules: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        modules += [nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        dim = hidden
    modules.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        modules.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*modules)


def linear_relu_linear(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear(in, in)-ReLU-Linear(in, out), no normalisation: USB's projection heads (CoMatch_Net / SimMatch_Net
    mlp_proj) and rotation heads. (N, in) -> (N, out)."""
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))


def init_head(module: nn.Module, scheme: str) -> None:
    """Re-initialise every Linear in `module`: 'trunc_normal' (std 0.02), 'kaiming', 'xavier'; 'default' keeps torch's."""
    if scheme == "default":
        return
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            if scheme == "trunc_normal":
                nn.init.trunc_normal_(layer.weight, std=0.02)
            elif scheme == "kaiming":
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            elif scheme == "xavier":
                nn.init.xavier_uniform_(layer.weight)
            else:
                raise ValueError(f"head init must be default, trunc_normal, kaiming or xavier, got {scheme!r}")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class Classifier(nn.Module):
    """backbone + linear head: images (N, C, H, W) -> logits (N, num_classes)."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
