"""EMP-SSL (Tong et al. 2023): many fixed-size patches per image, a total coding rate and patch invariance.

Each of N images is cut into V patches whose embeddings z_v,i ∈ ℝᴰ are L2-normalised by the model. Per patch index
v, Z_v (N, D) is the batch of the v-th patches; its total coding rate is

    R(Z_v) = ½ logdet(I_D + D / (N ε) · Z_vᵀ Z_v)

(ε as the reference code uses it, unsquared; the paper writes ε²). Invariance pulls every patch towards the mean of
its image's patches: inv = −mean_{v, i} cos(z_v,i, mean_u z_u,i). The loss (reference main.py) is

    loss = −tcr_coef · mean_v R(Z_v) + inv_coef · inv     (tcr_coef 1, inv_coef 200, ε 0.2).

The rate is computed on the smaller of the two Gram matrices (Sylvester: logdet(I_D + c·ZᵀZ) = logdet(I_N + c·ZZᵀ)),
so a batch smaller than D costs an N × N Cholesky instead of a D × D one.

The rate couples the batch: the reference trains in one process (nn.DataParallel) on the whole batch, so under
torchrun `EMPSSLLoss` all-gathers the patch embeddings (with gradients) and every rank computes the rate of the
global batch; the invariance term is per image and stays per rank.

lightly 1.6's EMPSSLLoss adds +R (its tcr_loss returns ½ logdet) where the reference's TotalCodingRate returns −R:
minimising lightly's sum lowers the rate (towards collapse). `total_coding_rate` equals lightly's `tcr_loss`;
`emp_ssl_loss` follows the reference's sign.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common import distributed as dist
from ._checks import check_non_negative, check_temperature, full_precision
from ._distributed import active_world


def _check_patches(z: Tensor, minimum_patches: int) -> None:
    if not hasattr(z, "ndim") or z.ndim != 3:
        raise ValueError(f"z must be a 3-D tensor (V patches, N images, D), got shape "
                         f"{tuple(getattr(z, 'shape', ()))}")
    if z.shape[0] < minimum_patches or z.shape[1] < 1:
        raise ValueError(f"emp_ssl_loss needs at least {minimum_patches} patches of at least 1 image, got V="
                         f"{z.shape[0]}, N={z.shape[1]} (z of shape {tuple(z.shape)})")


def _check_weights(eps: float, inv_coef: float, tcr_coef: float) -> None:
    check_temperature("eps", eps)
    check_non_negative("inv_coef", inv_coef)
    check_non_negative("tcr_coef", tcr_coef)


def _logdet_spd(matrix: Tensor) -> Tensor:
    """log-determinants of symmetric positive definite matrices (..., K, K) -> (...), by Cholesky."""
    return 2 * torch.linalg.cholesky(matrix).diagonal(dim1=-2, dim2=-1).log().sum(dim=-1)


def _rate(z: Tensor, eps: float) -> Tensor:
    """z (V, N, D) float -> mean over V of ½ logdet(I + D/(N ε) ZᵀZ), on the smaller Gram matrix."""
    _, n, d = z.shape
    gram = z.transpose(1, 2) @ z if d <= n else z @ z.transpose(1, 2)
    identity = torch.eye(gram.shape[-1], device=z.device, dtype=z.dtype)
    return 0.5 * _logdet_spd(identity + d / (n * eps) * gram).mean()


def total_coding_rate(z: Tensor, eps: float = 0.2) -> Tensor:
    """Total coding rate of each patch index's batch, averaged over patches. z: (V, N, D) (or (N, D): one set).
    -> scalar R = mean_v ½ logdet(I_D + D/(N ε) Z_vᵀ Z_v) (lightly's tcr_loss; the reference maximises it)."""
    z3 = z.unsqueeze(0) if hasattr(z, "ndim") and z.ndim == 2 else z
    _check_patches(z3, 1)
    check_temperature("eps", eps)
    with full_precision(z3):
        return _rate(z3.float(), eps)


def patch_invariance_loss(z: Tensor) -> Tensor:
    """−mean over patches and images of cos(z_v,i, mean_u z_u,i). z: (V, N, D). -> scalar in [−1, 1]."""
    _check_patches(z, 1)
    with full_precision(z):
        z = z.float()
        return -F.cosine_similarity(z, z.mean(dim=0, keepdim=True), dim=-1).mean()


def emp_ssl_loss(z: Tensor, eps: float = 0.2, inv_coef: float = 200.0, tcr_coef: float = 1.0) -> Tensor:
    """EMP-SSL. z: (V, N, D) L2-normalised embeddings of V ≥ 2 patches of each of N images. -> scalar
    −tcr_coef · total_coding_rate(z, eps) + inv_coef · patch_invariance_loss(z) (reference defaults: ε 0.2,
    inv_coef 200, tcr_coef 1)."""
    _check_patches(z, 2)
    _check_weights(eps, inv_coef, tcr_coef)
    return -tcr_coef * total_coding_rate(z, eps) + inv_coef * patch_invariance_loss(z)


class EMPSSLLoss(nn.Module):
    """emp_ssl_loss with the coding rate over the global batch. Under torchrun (gather_distributed and > 1 ranks,
    each with n images) the (V, n, D) embeddings are all-gathered along the images with gradients and every rank
    computes the rate of the (V, world·n, D) batch; the invariance term is this rank's mean. The mean over ranks
    and the engine-averaged gradient equal emp_ssl_loss on the global batch. Single process: exactly
    emp_ssl_loss."""

    def __init__(self, eps: float = 0.2, inv_coef: float = 200.0, tcr_coef: float = 1.0,
                 gather_distributed: bool = True) -> None:
        super().__init__()
        _check_weights(eps, inv_coef, tcr_coef)
        self.eps, self.inv_coef, self.tcr_coef, self.gather_distributed = eps, inv_coef, tcr_coef, gather_distributed

    def terms(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z: (V, n, D) this rank's normalised patch embeddings. -> (rate of the global batch, this rank's
        invariance loss), scalars."""
        _check_patches(z, 2)
        if active_world(self.gather_distributed) == 1:
            return total_coding_rate(z, self.eps), patch_invariance_loss(z)
        with full_precision(z):
            gathered = dist.gather_with_grad(z.float().transpose(0, 1)).transpose(0, 1)
            return _rate(gathered, self.eps), patch_invariance_loss(z)

    def weighted(self, rate: Tensor, invariance: Tensor) -> Tensor:
        """−tcr_coef · rate + inv_coef · invariance."""
        return -self.tcr_coef * rate + self.inv_coef * invariance

    def forward(self, z: Tensor) -> Tensor:
        """z: (V, n, D) this rank's normalised patch embeddings. -> scalar."""
        return self.weighted(*self.terms(z))
