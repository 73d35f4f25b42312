"""torchrun support: joining the process group; gradients are averaged with one flat all-reduce after backward.
The collectives every layer uses (rank, gathers) live in `ssl_kit.common.distributed` and are re-exported here."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import Tensor

from ..common.distributed import (all_reduce_mean, all_reduce_sum, gather_no_grad, gather_with_grad, is_distributed,
                                  is_main, rank, world_size)

__all__ = ["init_from_env", "all_reduce_gradients", "all_reduce_mean", "all_reduce_sum", "gather_no_grad",
           "gather_with_grad", "is_distributed", "is_main", "rank", "world_size"]


def init_from_env(device: str) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1). nccl on CUDA, gloo on CPU. -> distributed?"""
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    return True


def all_reduce_gradients(params: list[Tensor]) -> None:
    """Average .grad over ranks with one flat all-reduce (params without grad are skipped)."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
