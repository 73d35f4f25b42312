"""train.strategy fsdp: PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`) around a method under torchrun.

What is sharded: every parameter of the method, the momentum teachers / EMA targets a method holds included, each
as a DTensor split along its first dimension over all ranks. The units (what one all-gather brings in for a forward
and frees after it) are every ViT block (a `blocks` ModuleList's entries), then the root (the method), which holds
everything else. Top-level children (projectors, heads, teachers) are not units of their own: methods read some of
their weights directly inside training_step (prototypes, weight-normalised last layers, mask tokens), which works
only while the root's all-gather is in place. A momentum teacher is sharded exactly like its student (same shapes,
same placement), so `momentum_update`'s element-wise lerp runs shard by shard with no communication.

Gradients are reduce-scattered (averaged) by FSDP in the last micro-batch's backward; earlier micro-batches keep
unsharded gradients (`set_requires_gradient_sync(False)`, FSDP's no_sync). The trainer's EMA copy (train.ema_decay)
stays replicated and unsharded: it is updated from the gathered weights (one all-gather of the EMA target per step)
so that evaluation reads it on any rank without collectives.

Checkpoints keep the single-file format: torch.distributed.checkpoint's get_state_dict gathers full (unsharded)
model and optimizer state dicts to rank 0's CPU; the model's keys are those of the plain method, the optimizer's are
parameter names (DCP's format), the checkpoint records strategy 'fsdp'. After training, `release` turns the method
back into a plain module with full weights on every rank, so backbone.pt, final reports and later stages see what
they see under DDP.

Without torchrun (one process) fsdp has nothing to shard: the stage trains as one plain process, with a warning.
Refused before the first step, naming the way out (train.strategy: ddp): the methods and settings in UNSUPPORTED,
train.compile, and train.channels_last true (fully_shard shards contiguous weights only).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     get_model_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from ..errors import TrainingError

try:  # FSDP2's private registry, which `release` undoes; absent in another torch layout: fsdp is refused then
    from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
    from torch.distributed._composable_state import _module_state_mapping
except ImportError:  # pragma: no cover - depends on the torch version
    REGISTRY_KEY = STATE_KEY = _module_state_mapping = None

__all__ = ["check_supported", "shard_method", "gradient_sync", "full_tensor", "update_ema",
           "full_state", "load_full_state", "release", "gathered"]


def _gram_anchoring(cfg) -> bool:
    """DINOv2 with Gram anchoring on: its step copies the teacher's state_dict() into the Gram teacher inside the
    forward, and fully_shard's state-dict hook reshards the root mid-forward (seen: convolution on mixed Tensor and
    DTensor)."""
    return bool(getattr(cfg, "gram_weight", 0.0))


# method -> (whether a stage's settings make it touch sharded weights in a way FSDP breaks, why). Every other
# registered method trained 2 steps on its defaults under fsdp on 2 gloo ranks.
UNSUPPORTED = {"dinov2": (_gram_anchoring, "Gram anchoring (gram_weight > 0) copies the teacher's state dict inside "
                                           "the training step, which sharded weights do not allow")}


def check_supported(cfg, distributed: bool) -> bool:
    """Whether this stage (`cfg`: its config) shards: True under torchrun. One process (no process group) has
    nothing to shard: it trains as plain PyTorch, with a warning. A method and settings in UNSUPPORTED are refused
    before anything runs, in one process too."""
    breaks, why = UNSUPPORTED.get(cfg.method, (None, ""))
    if breaks is not None and breaks(cfg):
        raise TrainingError(f"stages[{cfg.name}]: method {cfg.method!r} cannot train with train.strategy fsdp: {why}; "
                            f"use train.strategy: ddp")
    if not distributed:
        warnings.warn("train.strategy fsdp without torchrun (one process): nothing to shard, training as one plain "
                      "process")
    return distributed


def _units(method: nn.Module) -> list[nn.Module]:
    """The ViT blocks of every `blocks` ModuleList in `method` (students, teachers, decoders), in module order."""
    units = []
    for name, module in method.named_modules():
        if name.split(".")[-1] == "blocks" and isinstance(module, nn.ModuleList):
            units.extend(block for block in module if any(True for _ in block.parameters()))
    return units


def shard_method(method: nn.Module, optimizer: torch.optim.Optimizer, trained: list[nn.Parameter]) -> None:
    """fully_shard every ViT block of `method` (already on its device), then the method itself, in place. Trainable
    parameters no optimizer group holds are frozen first (as under DDP). fully_shard replaces each parameter by a
    DTensor one of the same name: the optimizer's groups (still without state) are pointed at those."""
    trained_ids = {id(p) for p in trained}
    for param in method.parameters():
        if param.requires_grad and id(param) not in trained_ids:
            param.requires_grad_(False)
    names = {id(p): n for n, p in method.named_parameters(remove_duplicate=False)}
    for unit in _units(method):
        fully_shard(unit)
    fully_shard(method)
    _check_releasable(method)
    sharded = dict(method.named_parameters(remove_duplicate=False))
    for group in optimizer.param_groups:
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]


@contextmanager
def gradient_sync(method: nn.Module, sync: bool) -> Iterator[None]:
    """FSDP's no_sync: with sync False, backward keeps unsharded gradients for the next micro-batch."""
    method.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        method.set_requires_gradient_sync(True)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (an all-gather: every rank calls it), a plain tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def update_ema(ema_module: nn.Module, decay: float, target: nn.Module) -> None:
    """ModelEMA.update with a sharded target: ema ← decay·ema + (1 − decay)·gathered weights; buffers copied."""
    params = [full_tensor(p.detach()) for p in target.parameters()]
    torch._foreach_lerp_(list(ema_module.parameters()), params, 1.0 - decay)
    for ema_buffer, buffer in zip(ema_module.buffers(), target.buffers()):
        ema_buffer.copy_(buffer)


def full_state(method: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) full state dicts on rank 0's CPU ({} on other ranks); a collective: every rank calls it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(method, options=options),
            get_optimizer_state_dict(method, optimizer, options=options))


def load_full_state(method: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optimizer_state: dict) -> None:
    """Load full state dicts (every rank holds them) into the sharded method and its optimizer."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(method, model_state, options=options)
    set_optimizer_state_dict(method, optimizer, optimizer_state, options=options)


@contextmanager
def gathered(method: nn.Module) -> Iterator[None]:
    """Every FSDP unit of `method` all-gathered for the block (an evaluation outside the training forward); every
    rank must enter it and run the same forwards."""
    units = [m for m in method.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def _check_releasable(method: nn.Module) -> None:
    """`release` undoes fully_shard through FSDP2's internals (hook handles, parameter groups) as this torch version
    lays them out: check them at start, so that another layout stops the stage before training, not after it."""
    for unit in (m for m in method.modules() if isinstance(m, FSDPModule)):
        state = fully_shard.state(unit)
        groups = getattr(state, "_fsdp_param_groups", None)
        found = (hasattr(state, "_pre_forward_hook_handle") and hasattr(state, "_post_forward_hook_handle")
                 and isinstance(groups, list)
                 and all(hasattr(g, "_module_to_pre_save_state_dict_hook_handle")
                         and hasattr(g, "_module_to_pre_load_state_dict_hook_handle")
                         and all(hasattr(p, "_post_load_hook_handle") for p in g.fsdp_params) for g in groups))
        if not found or FSDPModule not in type(unit).__bases__ or _module_state_mapping is None:
            raise TrainingError(f"train.strategy fsdp: torch {torch.__version__}'s fully_shard is laid out unlike "
                                f"the torch this was written for (2.14), so the trained method could not be turned "
                                f"back into a plain module; use train.strategy: ddp")


def _strip(unit: nn.Module) -> None:
    """Remove fully_shard's hooks, registration and wrapper class from one unit (its parameters already plain)."""
    state = fully_shard.state(unit)
    state._pre_forward_hook_handle.remove()
    state._post_forward_hook_handle.remove()
    for group in state._fsdp_param_groups:
        for handles in (group._module_to_pre_save_state_dict_hook_handle,
                        group._module_to_pre_load_state_dict_hook_handle):
            for handle in handles.values():
                handle.remove()
        for param in group.fsdp_params:
            param._post_load_hook_handle.remove()
    _module_state_mapping.pop(unit, None)
    for key in (REGISTRY_KEY, STATE_KEY):
        unit.__dict__.pop(key, None)
    unit.__class__ = next(c for c in unit.__class__.__bases__ if c is not FSDPModule)


def release(method: nn.Module) -> None:
    """Turn a sharded method back into a plain module in place: every parameter gathered to a full tensor on every
    rank (a collective), FSDP's hooks and wrapper classes removed. Python attributes, buffers and module identity
    stay, so whatever holds the method (the runner) sees a plain, trained module."""
    units = [m for m in method.modules() if isinstance(m, FSDPModule)]
    if not units:
        return
    for unit in units:
        unit.reshard()
    for owner in method.modules():
        for name, param in list(owner._parameters.items()):
            if isinstance(param, DTensor):
                owner._parameters[name] = nn.Parameter(param.full_tensor().detach().clone(),
                                                       requires_grad=param.requires_grad)
    for unit in units:
        _strip(unit)
    if torch_dist.is_initialized():
        torch_dist.barrier()
