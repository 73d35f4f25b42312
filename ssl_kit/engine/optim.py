"""Optimizers by name from the parameter groups a method declares, weight decay excluded by shape, and LARS."""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..config import OptimizerConfig
from ..methods.param_groups import ParamGroup


def split_decay(group: ParamGroup, exclude_norm_and_bias: bool) -> list[ParamGroup]:
    """Split a group by shape: 1-D parameters (biases, norm scales/shifts, tokens of shape (1, 1, D) are not 1-D)
    get no weight decay. Shape, not name matching, decides."""
    params = [p for p in group.params if p.requires_grad]
    if not exclude_norm_and_bias:
        return [replace(group, params=params)]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    out = []
    if decay:
        out.append(replace(group, params=decay))
    if no_decay:
        out.append(replace(group, name=f"{group.name}/no_decay", params=no_decay, weight_decay=False))
    return out


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as SimCLR/BYOL use it.
    Each param's update is scaled by eta·‖w‖ / (‖g‖ + wd·‖w‖); groups with lars=False (1-D params) skip it."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.02,
                 nesterov: bool = False) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      nesterov=nesterov, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["lars"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
                    grad = grad.add(p, alpha=group["weight_decay"])
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["eta"] * w_norm / (g_norm + group["weight_decay"] * w_norm),
                                        torch.ones_like(w_norm))
                    grad = grad * trust
                elif group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = grad.clone()
                else:
                    buf.mul_(group["momentum"]).add_(grad)
                update = grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                p.add_(update, alpha=-group["lr"])
        return loss


def scaled_lr(cfg: OptimizerConfig, batch_size: int) -> float:
    """Base lr, scaled by global batch / base_batch_size (linear) or its square root (sqrt) when lr_scaling asks."""
    if cfg.lr_scaling == "linear":
        return cfg.lr * batch_size / cfg.base_batch_size
    if cfg.lr_scaling == "sqrt":
        return cfg.lr * math.sqrt(batch_size / cfg.base_batch_size)
    return cfg.lr


def lr_scaling_message(cfg: OptimizerConfig, batch_size: int) -> str:
    """One line stating the lr training starts from, e.g.
    'lr 0.3 × (1024/256) = 1.2 (linear scaling, global batch 1024)'."""
    lr = f"{scaled_lr(cfg, batch_size):.6g}"
    ratio = f"({batch_size}/{cfg.base_batch_size})"
    if cfg.lr_scaling == "linear":
        return f"lr {cfg.lr:g} × {ratio} = {lr} (linear scaling, global batch {batch_size})"
    if cfg.lr_scaling == "sqrt":
        return f"lr {cfg.lr:g} × √{ratio} = {lr} (sqrt scaling, global batch {batch_size})"
    return f"lr {cfg.lr:g} (no scaling, global batch {batch_size})"


def build_optimizer(groups: list[ParamGroup], cfg: OptimizerConfig, batch_size: int) -> torch.optim.Optimizer:
    """torch optimizer whose param groups carry 'base_lr' (lr × lr_scale), 'fixed_lr' (the schedule leaves the group
    at base_lr) and 'name' for the scheduler/logging."""
    lr = scaled_lr(cfg, batch_size)
    torch_groups = []
    for group in (g for raw in groups for g in split_decay(raw, cfg.exclude_norm_and_bias)):
        if not group.params:
            continue
        entry = {"params": group.params, "name": group.name, "base_lr": lr * group.lr_scale,
                 "lr": lr * group.lr_scale, "weight_decay": cfg.weight_decay if group.weight_decay else 0.0,
                 "fixed_lr": group.fixed_lr}
        if cfg.name == "lars":
            entry["lars"] = group.weight_decay  # no adaptation for biases and norm parameters either
        entry.update(group.extra)
        torch_groups.append(entry)
    if cfg.name == "sgd":
        return torch.optim.SGD(torch_groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adam":
        return torch.optim.Adam(torch_groups, lr=lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.name == "adamw":
        return torch.optim.AdamW(torch_groups, lr=lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(torch_groups, lr=lr, momentum=cfg.momentum, eps=cfg.eps)
    return LARS(torch_groups, lr=lr, momentum=cfg.momentum, eta=cfg.lars_eta, nesterov=cfg.nesterov)
