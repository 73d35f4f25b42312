"""VICReg: variance-invariance-covariance regularisation of two views' embeddings.

invariance = MSE(z1, z2); variance = mean over dimensions of relu(1 − sqrt(Var(z_d) + eps)) (hinge at γ = 1,
averaged over the two views); covariance = Σ_{i≠j} Cov(z)_ij² / D (summed over the two views). Var and Cov are
unbiased batch statistics. The Module wrapper computes variance and covariance over the global batch under torchrun,
as the reference implementation does (all-gather with gradients); the invariance term stays per sample.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common import distributed as dist
from ._checks import check_2d, check_batch, check_non_negative, check_same, check_temperature, full_precision
from ._distributed import active_world


def _variance_term(z: Tensor, eps: float) -> Tensor:
    """z (N, D) -> mean_d relu(1 − sqrt(Var_n(z_nd) + eps)), unbiased variance."""
    return F.relu(1 - torch.sqrt(z.var(dim=0) + eps)).mean()


def _covariance_term(z: Tensor) -> Tensor:
    """z (N, D) -> Σ_{i≠j} Cov(z)_ij² / D with the unbiased (N − 1) covariance."""
    n, d = z.shape
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (n - 1)
    return (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / d


def _regularisers(z1: Tensor, z2: Tensor, var_weight: float, cov_weight: float, eps: float) -> Tensor:
    with full_precision(z1):
        variance = 0.5 * (_variance_term(z1, eps) + _variance_term(z2, eps))
        covariance = _covariance_term(z1) + _covariance_term(z2)
        return var_weight * variance + cov_weight * covariance


def _check(z1: Tensor, z2: Tensor, sim_weight: float, var_weight: float, cov_weight: float, eps: float,
           minimum: int) -> None:
    check_2d("z1", z1)
    check_2d("z2", z2)
    check_same("z1", z1, "z2", z2)
    _check_weights(sim_weight, var_weight, cov_weight, eps)
    check_batch("vicreg_loss", z1, minimum)


def _check_weights(sim_weight: float, var_weight: float, cov_weight: float, eps: float) -> None:
    check_non_negative("sim_weight", sim_weight)
    check_non_negative("var_weight", var_weight)
    check_non_negative("cov_weight", cov_weight)
    check_temperature("eps", eps)


def vicreg_loss(z1: Tensor, z2: Tensor, sim_weight: float = 25.0, var_weight: float = 25.0, cov_weight: float = 1.0,
                eps: float = 1e-4) -> Tensor:
    """VICReg. z1, z2: (N, D) projections of two views (N ≥ 2), not normalised.
    loss = sim_weight · mean((z1 − z2)²) + var_weight · ½[v(z1) + v(z2)] + cov_weight · [c(z1) + c(z2)] with
    v(z) = mean_d relu(1 − sqrt(Var(z_d) + eps)) and c(z) = Σ_{i≠j} Cov(z)_ij² / D (unbiased). -> scalar."""
    _check(z1, z2, sim_weight, var_weight, cov_weight, eps, 2)
    z1, z2 = z1.float(), z2.float()
    return sim_weight * F.mse_loss(z1, z2) + _regularisers(z1, z2, var_weight, cov_weight, eps)


class VICRegLoss(nn.Module):
    """vicreg_loss with variance and covariance over the global batch. Under torchrun (gather_distributed and > 1
    ranks, each holding n samples) z1, z2 are all-gathered with gradients for those two terms, while the invariance
    term is this rank's mean; the mean over ranks and the engine-averaged gradient equal vicreg_loss on the global
    batch. Single process: exactly vicreg_loss."""

    def __init__(self, sim_weight: float = 25.0, var_weight: float = 25.0, cov_weight: float = 1.0,
                 eps: float = 1e-4, gather_distributed: bool = True) -> None:
        super().__init__()
        _check_weights(sim_weight, var_weight, cov_weight, eps)
        self.sim_weight, self.var_weight, self.cov_weight, self.eps = sim_weight, var_weight, cov_weight, eps
        self.gather_distributed = gather_distributed

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """z1, z2: (n, D) this rank's projections of the two views. -> scalar."""
        if active_world(self.gather_distributed) == 1:
            return vicreg_loss(z1, z2, self.sim_weight, self.var_weight, self.cov_weight, self.eps)
        _check(z1, z2, self.sim_weight, self.var_weight, self.cov_weight, self.eps, 1)
        z1, z2 = z1.float(), z2.float()
        invariance = F.mse_loss(z1, z2)
        regularisers = _regularisers(dist.gather_with_grad(z1), dist.gather_with_grad(z2), self.var_weight,
                                     self.cov_weight, self.eps)
        return self.sim_weight * invariance + regularisers
