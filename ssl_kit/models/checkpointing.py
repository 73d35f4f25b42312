"""backbone.grad_checkpointing: activation checkpointing of a backbone's transformer blocks. Each block keeps only
its input for the backward pass and runs again there (torch.utils.checkpoint, non-reentrant), trading ~30% more
compute for activation memory that no longer grows with depth: what lets a ViT-L train at a useful batch on one GPU."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError


def run_blocks(blocks, x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """tokens (N, L, D) through each block in turn; checkpointed when asked and gradients are being recorded
    (a teacher's or an evaluation's no-grad forward runs plainly)."""
    if not (checkpointing and torch.is_grad_enabled()):
        for block in blocks:
            x = block(x)
        return x
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False)
    return x


def enable_grad_checkpointing(backbone: nn.Module, where: str) -> nn.Module:
    """Turn activation checkpointing on for `backbone`: ssl_kit's ViTs (and timm ViTs behind our interface) through
    their `grad_checkpointing` flag, other timm models through timm's set_grad_checkpointing. -> the backbone.
    Anything else is refused, naming `where` (e.g. 'stages[pretrain].backbone.grad_checkpointing')."""
    if isinstance(getattr(type(backbone), "grad_checkpointing", None), bool):  # a class that runs run_blocks
        backbone.grad_checkpointing = True
        return backbone
    inner = getattr(backbone, "model", None)
    if inner is not None and hasattr(inner, "set_grad_checkpointing"):
        try:
            inner.set_grad_checkpointing(True)
            return backbone
        except (AssertionError, NotImplementedError, TypeError):
            pass
    raise ConfigError(f"{where}: {type(backbone).__name__} does not support activation checkpointing (supported: "
                      f"ssl_kit's ViTs, timm ViTs, and timm models with set_grad_checkpointing); set it to false")
