"""What the distributed Module wrappers share: how many ranks a loss spans, and all-reduces.

Convention (the same as NTXentLoss): the engine averages gradients over ranks, so each wrapper returns a per-rank
loss whose mean over ranks is the loss of the global batch, and whose gradient, summed over ranks by the
gradient-carrying collectives, makes the averaged parameter gradient equal to the global batch's.
"""
from __future__ import annotations

import torch
import torch.distributed
from torch import Tensor
from torch.distributed.nn.functional import all_reduce

from ..common import distributed as dist


def active_world(gather: bool) -> int:
    """Number of ranks a loss gathers over: world size when `gather` and torch.distributed runs with > 1 ranks."""
    if gather and dist.is_distributed() and dist.world_size() > 1:
        return dist.world_size()
    return 1


def all_reduce_sum_with_grad(x: Tensor) -> Tensor:
    """Sum of x over ranks; backward sums the incoming gradients over ranks as well."""
    return all_reduce(x)


@torch.no_grad()
def all_reduce_no_grad(x: Tensor, op: str = "sum") -> Tensor:
    """Sum (op="sum") or maximum (op="max") of x over ranks, without gradient; x itself is left unchanged."""
    out = x.detach().clone()
    ops = torch.distributed.ReduceOp
    torch.distributed.all_reduce(out, op=ops.SUM if op == "sum" else ops.MAX)
    return out
