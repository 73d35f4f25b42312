"""Exponential moving average of weights: ema ← decay·ema + (1 − decay)·param; buffers are copied."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA(nn.Module):
    """Holds a frozen copy of `model`; update() after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = [p for p in self.module.parameters()]
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)


@torch.no_grad()
def momentum_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target ← m·target + (1 − m)·online (MoCo/BYOL/DINO teachers); buffers copied."""
    torch._foreach_lerp_(list(target.parameters()), [p.detach() for p in online.parameters()], 1.0 - momentum)
    for t_buffer, buffer in zip(target.buffers(), online.buffers()):
        t_buffer.copy_(buffer)
