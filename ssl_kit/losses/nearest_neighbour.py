"""NNCLR: contrast each view's nearest neighbour from a support set of earlier embeddings with the other view.

`SupportSet` is the FIFO queue of L2-normalised projections (the paper's Q), `nearest_neighbours` the cosine
lookup (no gradient), `nnclr_loss` the symmetric InfoNCE of the paper (Dwibedi et al. 2021, eq. 2, symmetrised),
with in-batch negatives. Order within a step, as the paper and solo-learn: look up both views' neighbours, compute
the loss, then `support.update(z1.detach())`.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common import distributed as dist
from ._checks import check_2d, check_positive_int, check_same, check_temperature, full_precision
from ._distributed import active_world


@torch.no_grad()
def nearest_neighbours(z: Tensor, support: Tensor) -> Tensor:
    """z: (N, D), support: (M, D) with M ≥ 1, neither normalised. -> (N, D) float32: for each row of z the
    L2-normalised support row of highest cosine similarity (ties: the first). No gradient."""
    check_2d("z", z)
    check_2d("support", support)
    if support.shape[1] != z.shape[1]:
        raise ValueError(f"support has dimension {support.shape[1]}, z has {z.shape[1]}")
    if support.shape[0] < 1:
        raise ValueError("support is empty: it must hold at least one embedding (M ≥ 1)")
    if support.device != z.device:
        raise ValueError(f"support is on {support.device} but z is on {z.device}")
    bank = F.normalize(support.detach().float(), dim=1)
    with full_precision(z):
        similarity = F.normalize(z.detach().float(), dim=1) @ bank.T  # (N, M)
    return bank[similarity.argmax(dim=1)]


class SupportSet(nn.Module):
    """FIFO ring buffer of `size` L2-normalised embeddings of dimension `dim` (NNCLR's support set Q).

    Buffers (saved in state_dict, so resume is exact): `embeddings` (size, dim) and `pointer` (the next row to
    overwrite). It starts full of random unit vectors drawn from a generator seeded with `seed` (as lightly's and
    solo-learn's queues start random; the seed makes every rank's copy identical), which are replaced as batches
    arrive. `update(z)` enqueues z, gathered from every rank first under torchrun (gather_distributed and > 1
    ranks), so all ranks keep the same set."""

    def __init__(self, size: int, dim: int, gather_distributed: bool = True, seed: int = 0) -> None:
        super().__init__()
        check_positive_int("size", size)
        check_positive_int("dim", dim)
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("embeddings", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.gather_distributed = gather_distributed

    @torch.no_grad()
    def update(self, z: Tensor) -> None:
        """Enqueue z (n, dim) (normalised here, no gradient), oldest rows overwritten first: the same buffer and
        pointer as enqueueing the rows one by one (with more rows than `size`, only the last `size` remain)."""
        check_2d("z", z)
        if z.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"SupportSet holds dimension {self.embeddings.shape[1]}, got z of shape {tuple(z.shape)}")
        z = F.normalize(z.detach().float(), dim=1)
        if active_world(self.gather_distributed) > 1:
            z = dist.gather_no_grad(z)
        size, count = self.embeddings.shape[0], z.shape[0]
        kept = z[-size:]  # the rows that would survive enqueueing all `count` one by one
        start = self.pointer + (count - kept.shape[0])
        rows = (start + torch.arange(kept.shape[0], device=self.pointer.device)) % size
        self.embeddings[rows.to(self.embeddings.device)] = kept.to(self.embeddings)
        self.pointer.copy_((self.pointer + count) % size)

    def nearest(self, z: Tensor) -> Tensor:
        """nearest_neighbours(z, self.embeddings): (N, dim) -> (N, dim), no gradient."""
        return nearest_neighbours(z, self.embeddings)


def _check(z1: Tensor, z2: Tensor, p1: Optional[Tensor], p2: Optional[Tensor], temperature: float) -> None:
    check_2d("z1", z1)
    check_2d("z2", z2)
    check_same("z1", z1, "z2", z2)
    check_temperature("temperature", temperature)
    if (p1 is None) != (p2 is None):
        raise ValueError("pass both predictions p1 and p2, or neither")
    if p1 is not None:
        check_2d("p1", p1)
        check_same("p1", p1, "p2", p2)
        if p1.shape[0] != z1.shape[0]:
            raise ValueError(f"p1 has {p1.shape[0]} rows but z1 has {z1.shape[0]}")


def _queries_and_keys(z1: Tensor, z2: Tensor, support: Union[Tensor, SupportSet], p1: Optional[Tensor],
                      p2: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (nn1, nn2, k1, k2): the views' neighbours in the support set (no gradient) and the normalised keys
    (p1, p2, or z1, z2 without a predictor), all (N, D) float32."""
    bank = support.embeddings if isinstance(support, SupportSet) else support
    k1, k2 = (z1, z2) if p1 is None else (p1, p2)
    if bank.ndim == 2 and bank.shape[1] != k1.shape[1]:
        raise ValueError(f"support has dimension {bank.shape[1]} but the keys (predictions) have {k1.shape[1]}")
    nn1, nn2 = nearest_neighbours(z1, bank), nearest_neighbours(z2, bank)
    return nn1, nn2, F.normalize(k1.float(), dim=1), F.normalize(k2.float(), dim=1)


def _info_nce(queries: Tensor, keys: Tensor, offset: int, temperature: float) -> Tensor:
    """queries (n, D) normalised, keys (M, D) normalised; query i's positive is key offset + i. -> mean CE."""
    labels = torch.arange(queries.shape[0], device=queries.device) + offset
    with full_precision(queries):
        return F.cross_entropy(queries @ keys.T / temperature, labels)


def nnclr_loss(z1: Tensor, z2: Tensor, support: Union[Tensor, SupportSet], temperature: float = 0.1,
               p1: Optional[Tensor] = None, p2: Optional[Tensor] = None) -> Tensor:
    """NNCLR. z1, z2: (N, D) projections of two views (used for the neighbour lookup); support: (M, D) tensor or a
    SupportSet; p1, p2: optional (N, D) predictions (the keys; default z1, z2 themselves, i.e. no predictor).
    With nn_a = nearest_neighbours(z_a, support) (no gradient) and everything L2-normalised:
    loss = ½·[CE(nn_1 · p2ᵀ / τ, arange(N)) + CE(nn_2 · p1ᵀ / τ, arange(N))], each CE averaged over N:
    −log(exp(nn_1i·p2i/τ) / Σ_k exp(nn_1i·p2k/τ)): the other view's keys of the other samples are the negatives.
    Gradients reach only the keys. The support set is not updated here. -> scalar."""
    _check(z1, z2, p1, p2, temperature)
    nn1, nn2, k1, k2 = _queries_and_keys(z1, z2, support, p1, p2)
    return 0.5 * (_info_nce(nn1, k2, 0, temperature) + _info_nce(nn2, k1, 0, temperature))


class NNCLRLoss(nn.Module):
    """nnclr_loss with in-batch negatives from every rank. Under torchrun (gather_distributed and > 1 ranks, each
    holding n samples) the keys are all-gathered with gradients and query i of rank r has positive key r·n + i; the
    support set is the same on every rank (SupportSet.update gathers). The mean over ranks and the engine-averaged
    gradient equal nnclr_loss on the global batch. Single process: exactly nnclr_loss."""

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = True) -> None:
        super().__init__()
        check_temperature("temperature", temperature)
        self.temperature, self.gather_distributed = temperature, gather_distributed

    def forward(self, z1: Tensor, z2: Tensor, support: Union[Tensor, SupportSet], p1: Optional[Tensor] = None,
                p2: Optional[Tensor] = None) -> Tensor:
        """Arguments as nnclr_loss (this rank's rows). -> scalar."""
        if active_world(self.gather_distributed) == 1:
            return nnclr_loss(z1, z2, support, self.temperature, p1, p2)
        _check(z1, z2, p1, p2, self.temperature)
        nn1, nn2, k1, k2 = _queries_and_keys(z1, z2, support, p1, p2)
        g1, g2 = dist.gather_with_grad(k1), dist.gather_with_grad(k2)
        offset = dist.rank() * z1.shape[0]
        return 0.5 * (_info_nce(nn1, g2, offset, self.temperature) + _info_nce(nn2, g1, offset, self.temperature))
