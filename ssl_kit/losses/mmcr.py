"""MMCR (Yerxa et al. 2023): maximum manifold capacity representations.

Each image's K views are embedded and L2-normalised; their mean is the image's centroid c_i. The loss maximises the
nuclear norm (sum of singular values) of the (N, D) centroid matrix — centroids of different images spread over
many directions while each image's views agree (a centroid of unit vectors is long only when they align) — with an
optional λ-weighted penalty on the nuclear norm of each image's own (K, D) view matrix:

    loss = −‖[c_1 … c_N]‖_* + λ · mean_i ‖Z_i‖_*

The centroid term couples the whole batch, so the Module wrapper all-gathers the centroids (with gradients) under
torchrun; the local term stays per image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common import distributed as dist
from ._checks import check_batch, check_non_negative, full_precision
from ._distributed import active_world


def _check(z: Tensor, lambda_local: float, minimum: int) -> None:
    if not hasattr(z, "ndim") or z.ndim != 3:
        raise ValueError(f"z must be a 3-D tensor (N images, K views, D), got shape {tuple(getattr(z, 'shape', ()))}")
    if z.shape[1] < 2:
        raise ValueError(f"mmcr_loss needs at least 2 views per image, got K={z.shape[1]} (z of shape "
                         f"{tuple(z.shape)})")
    check_non_negative("lambda_local", lambda_local)
    check_batch("mmcr_loss", z, minimum)


def _local_term(z: Tensor, lambda_local: float) -> Tensor:
    """z (n, K, D) -> λ · Σ_i ‖Z_i‖_* / n (0 without computing the SVDs when λ = 0)."""
    if lambda_local == 0:
        return z.new_zeros(())
    return lambda_local * torch.linalg.svdvals(z).sum() / z.shape[0]


def mmcr_loss(z: Tensor, lambda_local: float = 0.0, normalize: bool = True) -> Tensor:
    """MMCR. z: (N, K, D) embeddings of K ≥ 2 views of each of N images (N ≥ 2), L2-normalised here unless
    normalize=False. loss = −(nuclear norm of the (N, D) matrix of per-image means over the K views) +
    lambda_local · mean over images of the nuclear norm of its (K, D) views (reference default λ = 0, lightly's
    MMCRLoss 5e-3; lightly's (online, momentum) pair is z = torch.cat([online, momentum], dim=1)). -> scalar."""
    _check(z, lambda_local, 2)
    with full_precision(z):
        z = F.normalize(z.float(), dim=-1) if normalize else z.float()
        centroids = z.mean(dim=1)
        return -torch.linalg.svdvals(centroids).sum() + _local_term(z, lambda_local)


class MMCRLoss(nn.Module):
    """mmcr_loss with the centroid nuclear norm over the global batch. Under torchrun (gather_distributed and > 1
    ranks, each with n images) the (n, D) centroids are all-gathered with gradients; the local term is this rank's
    mean. The mean over ranks and the engine-averaged gradient equal mmcr_loss on the global batch. Single
    process: exactly mmcr_loss."""

    def __init__(self, lambda_local: float = 0.0, normalize: bool = True, gather_distributed: bool = True) -> None:
        super().__init__()
        check_non_negative("lambda_local", lambda_local)
        self.lambda_local, self.normalize, self.gather_distributed = lambda_local, normalize, gather_distributed

    def forward(self, z: Tensor) -> Tensor:
        """z: (n, K, D) this rank's embeddings of K views per image. -> scalar."""
        if active_world(self.gather_distributed) == 1:
            return mmcr_loss(z, self.lambda_local, self.normalize)
        _check(z, self.lambda_local, 1)
        with full_precision(z):
            z = F.normalize(z.float(), dim=-1) if self.normalize else z.float()
            centroids = dist.gather_with_grad(z.mean(dim=1))
            return -torch.linalg.svdvals(centroids).sum() + _local_term(z, self.lambda_local)
