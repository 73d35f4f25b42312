"""DCL: decoupled contrastive loss (Yeh et al. 2022), and its von Mises-Fisher weighted variant DCLW.

NT-Xent with the positive pair taken out of the denominator (eq. 6 of the paper): for anchor z_i of one view and its
partner z_i' of the other, both L2-normalised,

    ℓ_i = −w_i · ⟨z_i, z_i'⟩/τ + log Σ_{j ≠ i, both views} exp(⟨z_i, z_j⟩/τ)

averaged over the 2N anchors of the two views. DCL: w_i = 1. DCLW ("vmf"): w_i = 2 − exp(⟨z_i, z_i'⟩/σ) /
mean_j exp(⟨z_j, z_j'⟩/σ), i.e. 2 − N · softmax_i(⟨z_i, z_i'⟩/σ), computed without gradient, so easy positives
(already close) weigh less than hard ones. The Module wrapper gathers the negatives over ranks with gradients and
normalises the vMF weights over the global batch, so distributed training equals dcl_loss on the global batch.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common import distributed as dist
from ._checks import check_2d, check_batch, check_same, check_temperature, full_precision
from ._distributed import active_world

WEIGHTINGS = ("none", "vmf")
Weighting = Literal["none", "vmf"]


def vmf_weights(positive: Tensor, sigma: float = 0.5) -> Tensor:
    """DCLW's negative von Mises-Fisher weights. positive: (N,) cosine similarities of each image's two views.
    -> (N,) 2 − N · softmax(positive / σ), without gradient (mean 1; harder positives weigh more)."""
    check_temperature("sigma", sigma)
    positive = positive.detach().float()
    return 2 - positive.shape[0] * torch.softmax(positive / sigma, dim=0)


def _check(z1: Tensor, z2: Tensor, temperature: float, weighting: str, sigma: float, minimum: int) -> None:
    check_2d("z1", z1)
    check_2d("z2", z2)
    check_same("z1", z1, "z2", z2)
    check_temperature("temperature", temperature)
    check_temperature("sigma", sigma)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    check_batch("dcl_loss", z1, minimum)


def _anchor_losses(anchors: Tensor, same_view: Tensor, other_view: Tensor, offset: int, temperature: float,
                   weights: Tensor) -> Tensor:
    """anchors (n, D) at rows offset.. of same_view (M, D); other_view (M, D) holds their partners at the same rows;
    all normalised. -> (n,) per-anchor losses −w·pos/τ + logsumexp over the 2M − 2 negatives."""
    n, m = anchors.shape[0], same_view.shape[0]
    own = torch.arange(n, device=anchors.device) + offset
    own_mask = F.one_hot(own, m).bool()  # (n, M): the anchor itself (same view) / its partner (other view)
    sim_same = anchors @ same_view.T / temperature
    sim_other = anchors @ other_view.T / temperature
    positive = sim_other[own_mask]
    negatives = torch.cat([sim_same[~own_mask].view(n, m - 1), sim_other[~own_mask].view(n, m - 1)], dim=1)
    return -weights * positive + torch.logsumexp(negatives, dim=1)


def _dcl(z1: Tensor, z2: Tensor, all1: Tensor, all2: Tensor, offset: int, temperature: float, weighting: str,
         sigma: float) -> Tensor:
    """z1, z2 (n, D) this rank's normalised views at rows offset.. of all1, all2 (M, D). -> scalar: mean over the 2n
    local anchors (their mean over ranks is the global batch's loss)."""
    if weighting == "vmf":
        everyone = vmf_weights((all1 * all2).sum(dim=1), sigma)
        weights = everyone[offset:offset + z1.shape[0]]
    else:
        weights = z1.new_ones(())
    loss1 = _anchor_losses(z1, all1, all2, offset, temperature, weights)
    loss2 = _anchor_losses(z2, all2, all1, offset, temperature, weights)
    return 0.5 * (loss1.mean() + loss2.mean())


def dcl_loss(z1: Tensor, z2: Tensor, temperature: float = 0.1, weighting: Weighting = "none",
             sigma: float = 0.5) -> Tensor:
    """Decoupled contrastive loss. z1, z2: (N, D) projections of two views (not normalised; N ≥ 2). Each of the 2N
    embeddings has its partner as the positive and the other 2N − 2 as negatives; unlike NT-Xent the positive is not
    in the log-sum-exp. weighting "vmf" (DCLW) scales each positive term by vmf_weights(cos(z1_i, z2_i), sigma).
    Mean over the 2N anchors. -> scalar."""
    _check(z1, z2, temperature, weighting, sigma, 2)
    with full_precision(z1):
        a, b = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
        return _dcl(a, b, a, b, 0, temperature, weighting, sigma)


class DCLLoss(nn.Module):
    """dcl_loss across ranks (gather_distributed): each rank's 2n anchors are contrasted with the 2·world·n gathered
    embeddings (gradient-carrying all-gather) and DCLW's weights are normalised over the global batch, so the mean
    over ranks and the engine-averaged gradient equal dcl_loss on the global batch. Single process: dcl_loss."""

    def __init__(self, temperature: float = 0.1, weighting: Weighting = "none", sigma: float = 0.5,
                 gather_distributed: bool = True) -> None:
        super().__init__()
        check_temperature("temperature", temperature)
        check_temperature("sigma", sigma)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        self.temperature, self.weighting, self.sigma = temperature, weighting, sigma
        self.gather_distributed = gather_distributed

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """z1, z2: (n, D) this rank's projections of the two views. -> scalar."""
        if active_world(self.gather_distributed) == 1:
            return dcl_loss(z1, z2, self.temperature, self.weighting, self.sigma)
        _check(z1, z2, self.temperature, self.weighting, self.sigma, 1)
        with full_precision(z1):
            a, b = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
            all1, all2 = dist.gather_with_grad(a), dist.gather_with_grad(b)
            return _dcl(a, b, all1, all2, dist.rank() * a.shape[0], self.temperature, self.weighting, self.sigma)
