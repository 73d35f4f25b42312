"""Momentum (EMA) teachers, declared once and updated in one place (solo-learn's `momentum_pairs` idea): a method
lists (online, target) module pairs; after every optimizer step each target becomes m·target + (1 − m)·online with m
on a half-cosine ramp from the method's base momentum to 1 (BYOL, MoCo, DINO)."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose parameters take no gradient (a momentum target / teacher)."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def cosine_ramp(start: float, end: float, step: int, total: int) -> float:
    """start -> end along a half cosine over `total` steps (momentum schedules: 0.996 -> 1)."""
    progress = min(max(step / max(1, total), 0.0), 1.0)
    return end - (end - start) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def momentum_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target ← m·target + (1 − m)·online, parameter by parameter; buffers (BN statistics) copied."""
    torch._foreach_lerp_(list(target.parameters()), [p.detach() for p in online.parameters()], 1.0 - momentum)
    for t_buffer, buffer in zip(target.buffers(), online.buffers()):
        t_buffer.copy_(buffer)


def update_momentum_pairs(pairs: list[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """Apply `momentum_update` to every (online, target) pair."""
    for online, target in pairs:
        momentum_update(target, online, momentum)
