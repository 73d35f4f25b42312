"""TiCo (Zhu et al. 2022): transformation invariance and covariance contrast.

With z_a the online and z_b the (momentum) target embeddings of two views, both L2-normalised (N, D), and C a
running (D, D) estimate of the embeddings' second moment,

    B = z_aᵀ z_a / N (no gradient),   C ← β·C + (1 − β)·B,
    loss = 1 − mean_i ⟨z_a,i, z_b,i⟩ + ρ · mean_i z_a,iᵀ C z_a,i

The first term pulls the two views together (invariance); the second pushes every embedding away from the directions
the recent embeddings occupy (a contrast against an implicit memory of all past batches), which prevents collapse.
tico_loss is pure (it returns the updated C); TiCoLoss keeps C in a buffer and, under torchrun, computes B over the
global batch (an all-reduce without gradient), so every rank holds the same C.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_2d, check_batch, check_non_negative, check_same, check_unit_interval, full_precision
from ._distributed import active_world, all_reduce_no_grad


def _check(z_a: Tensor, z_b: Tensor, covariance: Optional[Tensor], beta: float, rho: float, minimum: int) -> None:
    check_2d("z_a", z_a)
    check_2d("z_b", z_b)
    check_same("z_a", z_a, "z_b", z_b)
    _check_weights(beta, rho)
    check_batch("tico_loss", z_a, minimum)
    d = z_a.shape[1]
    if covariance is not None and tuple(covariance.shape) != (d, d):
        raise ValueError(f"covariance must have shape ({d}, {d}) for embeddings of dimension {d}, "
                         f"got {tuple(covariance.shape)}")


def _check_weights(beta: float, rho: float) -> None:
    check_unit_interval("beta", beta)
    check_non_negative("rho", rho)


def _tico(a: Tensor, b: Tensor, second_moment: Tensor, covariance: Optional[Tensor], beta: float,
          rho: float) -> tuple[Tensor, Tensor]:
    """a, b (n, D) normalised; second_moment (D, D) the batch's Σ aᵀa / N (no gradient). -> (loss, updated C)."""
    previous = torch.zeros_like(second_moment) if covariance is None else covariance.detach().float()
    updated = beta * previous + (1 - beta) * second_moment
    invariance = 1 - (a * b).sum(dim=1).mean()
    contrast = ((a @ updated) * a).sum(dim=1).mean()
    return invariance + rho * contrast, updated


def tico_loss(z_a: Tensor, z_b: Tensor, covariance: Optional[Tensor] = None, beta: float = 0.9,
              rho: float = 8.0) -> tuple[Tensor, Tensor]:
    """TiCo. z_a: (N, D) online projections (N ≥ 2); z_b: (N, D) the other view's target projections (normalised
    here; the caller detaches a momentum target). covariance: (D, D) the running C of the previous steps (None or
    zeros at the first step). -> (scalar loss, the updated C (D, D) without gradient, to pass in next step)."""
    _check(z_a, z_b, covariance, beta, rho, 2)
    with full_precision(z_a):
        a, b = F.normalize(z_a.float(), dim=1), F.normalize(z_b.float(), dim=1)
        second_moment = (a.T @ a).detach() / a.shape[0]
        return _tico(a, b, second_moment, covariance, beta, rho)


class TiCoLoss(nn.Module):
    """tico_loss with its covariance C kept in the `covariance` buffer (saved with the method, so a resumed run goes
    on with the same C), updated at every training-mode call. Under torchrun (gather_distributed and > 1 ranks, each
    with n samples) B is averaged over the global batch, so all ranks hold the same C; the loss is this rank's mean,
    whose mean over ranks and engine-averaged gradient equal the single-process loss on the global batch."""

    def __init__(self, dim: int, beta: float = 0.9, rho: float = 8.0, gather_distributed: bool = True) -> None:
        super().__init__()
        _check_weights(beta, rho)
        if not (isinstance(dim, int) and dim >= 1):
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        self.beta, self.rho, self.gather_distributed = beta, rho, gather_distributed
        self.register_buffer("covariance", torch.zeros(dim, dim))

    def forward(self, z_a: Tensor, z_b: Tensor, update: Optional[bool] = None) -> Tensor:
        """z_a, z_b: (n, D) this rank's online and target projections. update: write the new C into the buffer
        (default: in training mode). -> scalar."""
        world = active_world(self.gather_distributed)
        _check(z_a, z_b, self.covariance, self.beta, self.rho, 2 if world == 1 else 1)
        with full_precision(z_a):
            a, b = F.normalize(z_a.float(), dim=1), F.normalize(z_b.float(), dim=1)
            moment = (a.T @ a).detach()
            if world > 1:
                moment = all_reduce_no_grad(moment)
            loss, updated = _tico(a, b, moment / (world * a.shape[0]), self.covariance, self.beta, self.rho)
        if self.training if update is None else update:
            self.covariance.copy_(updated)
        return loss
