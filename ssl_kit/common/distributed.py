"""Process-group queries and collectives used by losses, methods and the engine alike. Every function is a no-op
(or the identity) in a single process without a process group, so the same code runs on 1 CPU process or N GPUs."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_mean(value: Tensor) -> Tensor:
    """Mean of a tensor over ranks (no gradient)."""
    if not is_distributed():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world_size()


def all_reduce_sum(value: Tensor) -> Tensor:
    """Sum of a tensor over ranks (no gradient)."""
    if not is_distributed():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order ([obj] in a single process)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # each rank's loss used every row; sum their contributions
        n = grad.shape[0] // world_size()
        return grad[rank() * n:(rank() + 1) * n]


def gather_with_grad(x: Tensor) -> Tensor:
    """(n, D) on each rank -> (world·n, D) in rank order; gradients flow back to every rank's rows."""
    if not is_distributed() or world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """(n, ...) on each rank -> (world·n, ...) in rank order, without gradient."""
    if not is_distributed() or world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)
