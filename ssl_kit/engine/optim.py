"""Optimizers by name from the parameter groups a method declares, weight decay excluded by shape, and LARS."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import torch

from ..config import OptimizerConfig
from ..errors import ConfigError
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
    Each param's update is scaled by eta·‖w‖ / (‖g‖ + wd·‖w‖); groups with lars=False (1-D params) skip it.

    foreach=True runs each group's update as a handful of multi-tensor kernels (norms, trust ratios over all the
    group's parameters as one vector, momentum, step) instead of ~8 kernels per parameter: the same arithmetic (the
    trust ratios in float32), for GPUs where launches dominate."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.02,
                 nesterov: bool = False, foreach: bool = False) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      nesterov=nesterov, lars=True))
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._foreach_group if self.foreach else self._loop_group)(group, params)
        return loss

    def _loop_group(self, group: dict, params: list[torch.Tensor]) -> None:
        for p in params:
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

    def _foreach_group(self, group: dict, params: list[torch.Tensor]) -> None:
        """_loop_group's arithmetic over the whole group at once (torch._foreach_* kernels)."""
        grads = [p.grad for p in params]
        wd = group["weight_decay"]
        if group["lars"]:
            # every parameter's norms in one vector (P,): the trust ratios are a few kernels, not a few per parameter
            w = torch.stack([n.float() for n in torch._foreach_norm(params)])
            g = torch.stack([n.float() for n in torch._foreach_norm(grads)])
            grads = torch._foreach_add(grads, params, alpha=wd) if wd else grads
            trusts = torch.where((w > 0) & (g > 0), group["eta"] * w / (g + wd * w), torch.ones_like(w))
            grads = torch._foreach_mul(grads, list(trusts.unbind()))  # new tensors: p.grad stays as backward left it
        elif wd:
            grads = torch._foreach_add(grads, params, alpha=wd)
        fresh = [i for i, p in enumerate(params) if "momentum_buffer" not in self.state[p]]
        for i in fresh:
            self.state[params[i]]["momentum_buffer"] = grads[i].clone()
        old = [i for i in range(len(params)) if i not in set(fresh)]
        if old:
            bufs = [self.state[params[i]]["momentum_buffer"] for i in old]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, [grads[i] for i in old])
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        updates = torch._foreach_add(grads, bufs, alpha=group["momentum"]) if group["nesterov"] else bufs
        torch._foreach_add_(params, updates, alpha=-group["lr"])


def optimizer_implementation(name: str, implementation: str, device: Optional[torch.device]) -> str:
    """optimizer.implementation resolved for optimizer `name` on `device`: 'auto' -> fused for sgd/adam/adamw on
    CUDA (one kernel per step), foreach for lars/rmsprop on CUDA, for_loop on the CPU (torch's own CPU default, and
    the arithmetic every measured number in the docs used). A fused request torch cannot honour is refused."""
    cuda = device is not None and device.type == "cuda"
    if implementation == "auto":
        if not cuda:
            return "for_loop"
        return "fused" if name in FUSED_OPTIMIZERS else "foreach"
    if implementation == "fused" and (name not in FUSED_OPTIMIZERS or not (cuda or name in ("adam", "adamw"))):
        raise ConfigError(f"optimizer.implementation=fused: torch has a fused {name} only for "
                          f"{', '.join(FUSED_OPTIMIZERS)} on CUDA (adam/adamw on the CPU too); use foreach or auto")
    return implementation


FUSED_OPTIMIZERS = ("sgd", "adam", "adamw")


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


def build_optimizer(groups: list[ParamGroup], cfg: OptimizerConfig, batch_size: int,
                    device: Optional[torch.device] = None) -> torch.optim.Optimizer:
    """torch optimizer whose param groups carry 'base_lr' (lr × lr_scale), 'fixed_lr' (the schedule leaves the group
    at base_lr), 'base_weight_decay' (None for groups without decay) and 'name' for the scheduler/logging; its kernels per optimizer.implementation on `device`."""
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
        entry["base_weight_decay"] = cfg.weight_decay if group.weight_decay else None  # the schedule's start
        torch_groups.append(entry)
    implementation = optimizer_implementation(cfg.name, cfg.implementation, device)
    kernels = {"fused": True} if implementation == "fused" else {"foreach": implementation == "foreach"}
    if cfg.name == "sgd":
        return torch.optim.SGD(torch_groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **kernels)
    if cfg.name == "adam":
        return torch.optim.Adam(torch_groups, lr=lr, betas=cfg.betas, eps=cfg.eps, **kernels)
    if cfg.name == "adamw":
        return torch.optim.AdamW(torch_groups, lr=lr, betas=cfg.betas, eps=cfg.eps, **kernels)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(torch_groups, lr=lr, momentum=cfg.momentum, eps=cfg.eps, **kernels)
    return LARS(torch_groups, lr=lr, momentum=cfg.momentum, eta=cfg.lars_eta, nesterov=cfg.nesterov,
                foreach=implementation == "foreach")
