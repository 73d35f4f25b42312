"""SwAV: swapped prediction of online cluster assignments.

Codes are computed without gradient by Sinkhorn-Knopp from the prototype scores of each high-resolution crop
(equipartition over the batch: every prototype receives the same total mass), and every other crop predicts them
with a cross-entropy against softmax(scores / τ).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_2d, check_positive_int, check_temperature, check_views
from ._distributed import active_world, all_reduce_no_grad


def _sum_over_ranks(world: int):
    return (lambda x: all_reduce_no_grad(x, "sum")) if world > 1 else (lambda x: x)


@torch.no_grad()
def sinkhorn(scores: Tensor, iterations: int = 3, epsilon: float = 0.05, gather_distributed: bool = True) -> Tensor:
    """Sinkhorn-Knopp soft assignments of B samples to K prototypes (SwAV's `distributed_sinkhorn`).
    scores: (N, K) prototype scores (cosine similarities of normalised features and prototypes). Starting from
    Q = exp(scores / epsilon)ᵀ, alternately make every prototype's row sum 1/K and every sample's column sum 1/B,
    `iterations` times; returns B·Q transposed: (N, K) float32, each row sums to 1, no gradient.
    Under torchrun (gather_distributed and > 1 ranks, each holding N rows) the sums over samples are all-reduced
    and B = world·N, so the codes equal those of the global batch. The global maximum of scores/epsilon is
    subtracted before exp (it cancels in the normalisation; it only prevents overflow)."""
    check_2d("scores", scores)
    check_positive_int("iterations", iterations)
    check_temperature("epsilon", epsilon)
    if scores.shape[0] < 1:
        raise ValueError("sinkhorn needs at least one sample, got scores of shape (0, K)")
    world = active_world(gather_distributed)
    reduce = _sum_over_ranks(world)
    logits = scores.detach().float() / epsilon
    peak = logits.max()
    if world > 1:
        peak = all_reduce_no_grad(peak, "max")
    q = torch.exp(logits - peak).T  # (K, N)
    q /= reduce(q.sum())
    k, b = q.shape[0], q.shape[1] * world
    for _ in range(iterations):
        q /= reduce(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).T


def _check_crops(high: list[Tensor], low: list[Tensor], queue: Optional[list[Tensor]]) -> None:
    if not high:
        raise ValueError("swav_loss needs at least one high-resolution crop, got none")
    if len(high) + len(low) < 2:
        raise ValueError(f"swav_loss needs at least 2 crops in all, got {len(high)} high-res and {len(low)} low-res")
    check_views([("high_res_scores", high), ("low_res_scores", low)], "high_res_scores[0]", high[0].shape)
    shape = high[0].shape
    if queue is None:
        return
    if len(queue) != len(high):
        raise ValueError(f"queue_scores must hold one (M, K) tensor per high-resolution crop: got {len(queue)} for "
                         f"{len(high)} crops")
    for i, scores in enumerate(queue):
        check_2d(f"queue_scores[{i}]", scores)
        if scores.shape[1] != shape[1]:
            raise ValueError(f"queue_scores[{i}] has {scores.shape[1]} prototypes, the crops have {shape[1]}")


def _swav(high: list[Tensor], low: list[Tensor], queue: Optional[list[Tensor]], temperature: float,
          iterations: int, epsilon: float, gather_distributed: bool) -> Tensor:
    n = high[0].shape[0]
    log_probs = [F.log_softmax(s.float() / temperature, dim=1) for s in high + low]
    total = 0.0
    for i, scores in enumerate(high):
        code_input = scores if queue is None else torch.cat([queue[i].to(scores.dtype), scores])
        codes = sinkhorn(code_input, iterations, epsilon, gather_distributed)[-n:]
        crop_losses = [-(codes * log_p).sum(dim=1).mean() for v, log_p in enumerate(log_probs) if v != i]
        total = total + sum(crop_losses) / len(crop_losses)
    return total / len(high)


def swav_loss(high_res_scores: Sequence[Tensor], low_res_scores: Sequence[Tensor] = (),
              queue_scores: Optional[Sequence[Tensor]] = None, temperature: float = 0.1, sinkhorn_iterations: int = 3,
              epsilon: float = 0.05) -> Tensor:
    """SwAV's swapped-prediction loss on this process's batch.
    high_res_scores: list of H ≥ 1 tensors (N, K), the prototype scores of each high-resolution (global) crop;
    low_res_scores: list of (N, K) for the low-resolution (local) crops, H + len(low) ≥ 2;
    queue_scores: None, or one (M, K) tensor per high-resolution crop: scores of earlier batches' features of that
    crop against the current prototypes, placed before the batch for Sinkhorn (as SwAV's queue) and then dropped.
    For each high-res crop i: codes q_i = sinkhorn(scores_i) (no gradient); every other crop v (high or low)
    predicts them: CE_v = −mean_n Σ_k q_i log softmax(scores_v / temperature). The loss averages CE_v over the
    V − 1 other crops, then over the H high-res crops (as the paper and lightly's SwaVLoss). -> scalar."""
    high, low = list(high_res_scores), list(low_res_scores)
    queue = None if queue_scores is None else list(queue_scores)
    _check_crops(high, low, queue)
    check_temperature("temperature", temperature)
    check_positive_int("sinkhorn_iterations", sinkhorn_iterations)
    check_temperature("epsilon", epsilon)
    return _swav(high, low, queue, temperature, sinkhorn_iterations, epsilon, gather_distributed=False)


class SwAVLoss(nn.Module):
    """swav_loss whose Sinkhorn codes are computed over the global batch under torchrun (gather_distributed and
    > 1 ranks, each holding N samples and its own queue): the sums over samples are all-reduced as in SwAV's
    distributed_sinkhorn, the cross-entropies are this rank's means. The mean over ranks and the engine-averaged
    gradient equal swav_loss on the global batch (each rank's queue followed by its crops, in rank order)."""

    def __init__(self, temperature: float = 0.1, sinkhorn_iterations: int = 3, epsilon: float = 0.05,
                 gather_distributed: bool = True) -> None:
        super().__init__()
        check_temperature("temperature", temperature)
        check_positive_int("sinkhorn_iterations", sinkhorn_iterations)
        check_temperature("epsilon", epsilon)
        self.temperature, self.sinkhorn_iterations, self.epsilon = temperature, sinkhorn_iterations, epsilon
        self.gather_distributed = gather_distributed

    def forward(self, high_res_scores: Sequence[Tensor], low_res_scores: Sequence[Tensor] = (),
                queue_scores: Optional[Sequence[Tensor]] = None) -> Tensor:
        """Arguments as swav_loss (this rank's crops and queue). -> scalar."""
        high, low = list(high_res_scores), list(low_res_scores)
        queue = None if queue_scores is None else list(queue_scores)
        _check_crops(high, low, queue)
        return _swav(high, low, queue, self.temperature, self.sinkhorn_iterations, self.epsilon,
                     self.gather_distributed)
