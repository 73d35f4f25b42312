"""DINOv2's linear-evaluation features of a ViT: the [cls] tokens of its last `n_last_blocks` blocks, each through the
backbone's final norm, concatenated, and with `avgpool` the mean of the last block's normalised patch tokens after
them (dinov2/eval/linear.py: `create_linear_input`, over `get_intermediate_layers(n, norm=True)`; the paper's grid is
n_last_blocks ∈ {1, 4} × avgpool ∈ {false, true}). An evaluation-time reading of any ssl_kit or timm ViT: the weights
and the backbone's own forward are untouched, so a backbone.pt trained for [cls] can be read this way afterwards.
PatchTokens reads the last block's normalised patch tokens the same way, for the attentive probe.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


def require_vit(backbone: nn.Module, what: str, advice: str) -> nn.ModuleList:
    """A ViT's blocks (it must have `blocks` and a final `norm`), or a ConfigError: "`what` a ViT's block outputs;
    ... (`advice`)"."""
    blocks = getattr(backbone, "blocks", None)
    if blocks is None or not hasattr(backbone, "norm"):
        arch = getattr(backbone, "arch", type(backbone).__name__)
        raise ConfigError(f"{what} a ViT's block outputs; backbone {arch!r} has no transformer blocks "
                          f"({advice})")
    return blocks


def last_block_tokens(backbone: nn.Module, x: torch.Tensor, n_blocks: int = 1) -> list[torch.Tensor]:
    """The outputs of a ViT's last `n_blocks` blocks on images x (N, C, H, W), each through its final norm ->
    n_blocks tensors (N, prefix + L, D) ([cls], the registers, then the L patch tokens), read by forward hooks while
    the backbone's own forward runs."""
    outputs: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda _module, _args, out: outputs.append(out))
             for block in backbone.blocks[-n_blocks:]]
    try:
        backbone(x)
    finally:
        for hook in hooks:
            hook.remove()
    return [backbone.norm(out) for out in outputs]


def token_prefix(backbone: nn.Module) -> int:
    """How many tokens come before a ViT's patch tokens: [cls] and the register tokens."""
    return 1 + int(getattr(backbone, "num_registers", 0))


def copy_identity(source: nn.Module, target: nn.Module, **extra_kwargs) -> None:
    """Give a module reading `source` the attributes evaluation keys and converts images by (data_info, arch,
    global_pool), and its build kwargs plus `extra_kwargs` as arch_kwargs (feature_identity)."""
    for name in ("data_info", "arch"):
        if hasattr(source, name):
            setattr(target, name, getattr(source, name))
    target.arch_kwargs = dict(getattr(source, "arch_kwargs", None) or {}, **extra_kwargs)
    target.global_pool = getattr(source, "global_pool", None)


class PatchTokens(nn.Module):
    """images (N, C, H, W) -> a ViT's last-block patch tokens through its final norm (N, L, D), [cls] and registers
    left out: what an attentive probe pools (CAPI's "patch" representation). With `flat`, each image's tokens as one
    row (N, L · D), the shape the feature cache stores."""

    def __init__(self, backbone: nn.Module, flat: bool = False) -> None:
        super().__init__()
        require_vit(backbone, "the attentive probe pools",
                    "use linear_probe or knn for other backbones")
        self.backbone, self.prefix, self.flat = backbone, token_prefix(backbone), flat
        self.num_features = backbone.num_features  # D, the width of one token
        copy_identity(backbone, self, tokens="patch")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = last_block_tokens(self.backbone, x)[0][:, self.prefix:]
        return tokens.flatten(1) if self.flat else tokens


class ViTReadout(nn.Module):
    """images (N, C, H, W) -> features (N, D · (n_last_blocks + avgpool)) of a ViT `backbone` (blocks, norm,
    num_registers), read by forward hooks on its last blocks while its own forward runs."""

    def __init__(self, backbone: nn.Module, n_last_blocks: int = 1, avgpool: bool = False) -> None:
        super().__init__()
        blocks = require_vit(backbone, "n_last_blocks / avgpool read",
                             "use them with a ViT, or leave them at 1 / false")
        if not 1 <= n_last_blocks <= len(blocks):
            raise ConfigError(f"n_last_blocks must be between 1 and the backbone's {len(blocks)} blocks, got "
                              f"{n_last_blocks}")
        self.backbone, self.n_last_blocks, self.avgpool = backbone, n_last_blocks, avgpool
        self.prefix = token_prefix(backbone)
        self.num_features = backbone.num_features * (n_last_blocks + int(avgpool))
        copy_identity(backbone, self, n_last_blocks=n_last_blocks, avgpool=avgpool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = last_block_tokens(self.backbone, x, self.n_last_blocks)  # (N, prefix + L, D) each
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
