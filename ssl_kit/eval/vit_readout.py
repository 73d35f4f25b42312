"""DINOv2's linear-evaluation features of a ViT: the [cls] tokens of its last `n_last_blocks` blocks, each through the
backbone's final norm, concatenated, and with `avgpool` the mean of the last block's normalised patch tokens after
them (dinov2/eval/linear.py: `create_linear_input`, over `get_intermediate_layers(n, norm=True)`; the paper's grid is
n_last_blocks ∈ {1, 4} × avgpool ∈ {false, true}). An evaluation-time reading of any ssl_kit or timm ViT: the weights
and the backbone's own forward are untouched, so a backbone.pt trained for [cls] can be read this way afterwards.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


class ViTReadout(nn.Module):
    """images (N, C, H, W) -> features (N, D · (n_last_blocks + avgpool)) of a ViT `backbone` (blocks, norm,
    num_registers), read by forward hooks on its last blocks while its own forward runs."""

    def __init__(self, backbone: nn.Module, n_last_blocks: int = 1, avgpool: bool = False) -> None:
        super().__init__()
        blocks = getattr(backbone, "blocks", None)
        if blocks is None or not hasattr(backbone, "norm"):
            arch = getattr(backbone, "arch", type(backbone).__name__)
            raise ConfigError(f"n_last_blocks / avgpool read a ViT's block outputs; backbone {arch!r} has no "
                              f"transformer blocks (use them with a ViT, or leave them at 1 / false)")
        if not 1 <= n_last_blocks <= len(blocks):
            raise ConfigError(f"n_last_blocks must be between 1 and the backbone's {len(blocks)} blocks, got "
                              f"{n_last_blocks}")
        self.backbone, self.n_last_blocks, self.avgpool = backbone, n_last_blocks, avgpool
        self.prefix = 1 + int(getattr(backbone, "num_registers", 0))  # [cls] and the register tokens
        self.num_features = backbone.num_features * (n_last_blocks + int(avgpool))
        for name in ("data_info", "arch"):
            if hasattr(backbone, name):
                setattr(self, name, getattr(backbone, name))
        self.arch_kwargs = dict(getattr(backbone, "arch_kwargs", None) or {}, n_last_blocks=n_last_blocks,
                                avgpool=avgpool)
        self.global_pool = getattr(backbone, "global_pool", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs: list[torch.Tensor] = []
        hooks = [block.register_forward_hook(lambda _module, _args, out: outputs.append(out))
                 for block in self.backbone.blocks[-self.n_last_blocks:]]
        try:
            self.backbone(x)
        finally:
            for hook in hooks:
                hook.remove()
        tokens = [self.backbone.norm(out) for out in outputs]  # (N, prefix + L, D) each
        parts = [t[:, 0] for t in tokens]
        if self.avgpool:
            parts.append(tokens[-1][:, self.prefix:].mean(dim=1))
        return torch.cat(parts, dim=1)


def vit_readout(backbone: nn.Module, n_last_blocks: int = 1, avgpool: bool = False) -> nn.Module:
    """The backbone itself for the defaults (its own forward: [cls], or the patch mean with global_pool), otherwise
    its ViTReadout."""
    if n_last_blocks == 1 and not avgpool:
        return backbone
    return ViTReadout(backbone, n_last_blocks, avgpool).eval()
