"""Barlow Twins: make the cross-correlation matrix of two views' batch-standardised embeddings the identity.

Invariance (diagonal → 1) plus λ·redundancy reduction (off-diagonal → 0). Statistics are over the batch, so the
Module wrapper computes them over the global batch under torchrun, as the paper does (SyncBatchNorm followed by an
all-reduce of the cross-correlation).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ._checks import check_2d, check_batch, check_non_negative, check_same, full_precision
from ._distributed import active_world, all_reduce_sum_with_grad

BATCH_NORM_EPS = 1e-5  # the standardisation is BatchNorm1d(affine=False) in training mode: biased variance + 1e-5


def _identity(x: Tensor) -> Tensor:
    return x


def _standardise(z: Tensor, total: int, reduce: Callable[[Tensor], Tensor]) -> Tensor:
    """z (n, D) -> (z − mean) / sqrt(var + 1e-5) with mean and biased variance over the `total` samples of which
    `reduce` sums the per-rank sums."""
    mean = reduce(z.sum(dim=0)) / total
    centred = z - mean
    var = reduce(centred.pow(2).sum(dim=0)) / total
    return centred / torch.sqrt(var + BATCH_NORM_EPS)


def _barlow_twins(z1: Tensor, z2: Tensor, lambda_offdiag: float, total: int,
                  reduce: Callable[[Tensor], Tensor]) -> Tensor:
    with full_precision(z1):
        a = _standardise(z1.float(), total, reduce)
        b = _standardise(z2.float(), total, reduce)
        c = reduce(a.T @ b) / total  # (D, D) cross-correlation
        diagonal = torch.diagonal(c)
        on_diag = (1 - diagonal).pow(2).sum()
        off_diag = c.pow(2).sum() - diagonal.pow(2).sum()
        return on_diag + lambda_offdiag * off_diag


def _check(z1: Tensor, z2: Tensor, lambda_offdiag: float, minimum: int) -> None:
    check_2d("z1", z1)
    check_2d("z2", z2)
    check_same("z1", z1, "z2", z2)
    check_non_negative("lambda_offdiag", lambda_offdiag)
    check_batch("barlow_twins_loss", z1, minimum)


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambda_offdiag: float = 5e-3) -> Tensor:
    """Barlow Twins. z1, z2: (N, D) projections of two views (N ≥ 2). Each dimension is standardised over the
    batch (mean 0, biased std 1, eps 1e-5 as BatchNorm), c = z1ᵀ z2 / N is the (D, D) cross-correlation, and
    loss = Σ_i (1 − c_ii)² + lambda_offdiag · Σ_{i≠j} c_ij². Identical, decorrelated views give 0. -> scalar."""
    _check(z1, z2, lambda_offdiag, 2)
    return _barlow_twins(z1, z2, lambda_offdiag, z1.shape[0], _identity)


class BarlowTwinsLoss(nn.Module):
    """barlow_twins_loss over the global batch. Under torchrun (gather_distributed and > 1 ranks, each holding the
    same number n of samples) the means, variances and the cross-correlation are sums over every rank's rows
    (gradient-carrying all-reduces), so every rank returns the global batch's loss and the engine's gradient
    average equals the single-process gradient on the global batch. Single process: exactly barlow_twins_loss."""

    def __init__(self, lambda_offdiag: float = 5e-3, gather_distributed: bool = True) -> None:
        super().__init__()
        check_non_negative("lambda_offdiag", lambda_offdiag)
        self.lambda_offdiag, self.gather_distributed = lambda_offdiag, gather_distributed

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """z1, z2: (n, D) this rank's projections of the two views. -> scalar."""
        world = active_world(self.gather_distributed)
        if world == 1:
            return barlow_twins_loss(z1, z2, self.lambda_offdiag)
        _check(z1, z2, self.lambda_offdiag, 1)
        return _barlow_twins(z1, z2, self.lambda_offdiag, world * z1.shape[0], all_reduce_sum_with_grad)
