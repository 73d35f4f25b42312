"""Temperature-scaled contrastive losses: NT-Xent (SimCLR) and InfoNCE (MoCo). Pure functions, plus nn.Module
wrappers that gather embeddings across ranks with gradients (positives offset by rank).

The temperature τ divides the similarities before the softmax: τ < 1 sharpens the distribution so the hardest
negatives dominate the gradient, τ > 1 smooths it towards uniform. Softmax math runs in fp32 under autocast.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common import distributed as dist
from ._checks import check_2d, check_same, check_temperature


def _nt_xent_logits(anchors: Tensor, candidates: Tensor, temperature: float, anchor_offset: int) -> tuple[Tensor, Tensor]:
    """anchors (M, D) at rows anchor_offset.. of candidates (2N, D), both normalised -> logits (M, 2N) with the
    self-similarity masked, and target indices (M,) of each anchor's partner (i <-> i ± N)."""
    m, two_n = anchors.shape[0], candidates.shape[0]
    n = two_n // 2
    logits = anchors @ candidates.T / temperature
    rows = torch.arange(m, device=anchors.device)
    own = rows + anchor_offset
    logits[rows, own] = float("-inf")
    targets = (own + n) % two_n
    return logits, targets


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """SimCLR's NT-Xent. z1, z2: (N, D) projections of two views (not normalised). Each of the 2N embeddings has
    its partner as the positive and the other 2N − 2 as negatives; cross-entropy over cosine similarity / τ,
    averaged over all 2N anchors. -> scalar."""
    check_2d("z1", z1)
    check_2d("z2", z2)
    check_same("z1", z1, "z2", z2)
    check_temperature("temperature", temperature)
    if z1.shape[0] < 2:
        raise ValueError(f"nt_xent_loss needs at least 2 pairs (negatives), got N={z1.shape[0]}")
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits, targets = _nt_xent_logits(z, z, temperature, 0)
    return F.cross_entropy(logits, targets)


def info_nce_loss(query: Tensor, key: Tensor, negatives: Optional[Tensor] = None, temperature: float = 0.2) -> Tensor:
    """MoCo's InfoNCE. query, key: (N, D); negatives: (K, D) queue or None. Inputs are L2-normalised here.
    With a queue: logits [q·k⁺, q·queue]/τ, label 0. Without: in-batch keys, q @ k.T / τ, labels arange(N).
    Mean over N. -> scalar. The key (and queue) get no gradient only if the caller detaches them."""
    check_2d("query", query)
    check_2d("key", key)
    check_same("query", query, "key", key)
    check_temperature("temperature", temperature)
    q = F.normalize(query.float(), dim=1)
    k = F.normalize(key.float(), dim=1)
    if negatives is None:
        logits = q @ k.T / temperature
        return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))
    check_2d("negatives", negatives)
    if negatives.shape[1] != query.shape[1]:
        raise ValueError(f"negatives have dimension {negatives.shape[1]}, query has {query.shape[1]}")
    if negatives.device != query.device:
        raise ValueError(f"negatives are on {negatives.device} but query is on {query.device}")
    neg = F.normalize(negatives.float(), dim=1)
    positive = (q * k).sum(dim=1, keepdim=True)
    logits = torch.cat([positive, q @ neg.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class NTXentLoss(nn.Module):
    """nt_xent_loss across ranks: each rank's 2n anchors are contrasted with the 2·world·n gathered embeddings.
    Single process: exactly nt_xent_loss. Distributed: equals nt_xent_loss on the concatenated global batch."""

    def __init__(self, temperature: float = 0.1, gather: bool = True) -> None:
        super().__init__()
        check_temperature("temperature", temperature)
        self.temperature, self.gather = temperature, gather

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        if not (self.gather and dist.is_distributed() and dist.world_size() > 1):
            return nt_xent_loss(z1, z2, self.temperature)
        check_same("z1", z1, "z2", z2)
        n, world, rank = z1.shape[0], dist.world_size(), dist.rank()
        local1, local2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
        all1, all2 = dist.gather_with_grad(local1), dist.gather_with_grad(local2)
        candidates = torch.cat([all1, all2])  # global layout: [view1 of all ranks, view2 of all ranks]
        total = world * n
        losses = []
        for local, offset in ((local1, rank * n), (local2, total + rank * n)):
            logits, targets = _nt_xent_logits(local, candidates, self.temperature, offset)
            losses.append(F.cross_entropy(logits, targets, reduction="sum"))
        return (losses[0] + losses[1]) / (2 * n)


class InfoNCELoss(nn.Module):
    """info_nce_loss; with gather and no queue, in-batch keys come from every rank (label = rank·n + i)."""

    def __init__(self, temperature: float = 0.2, gather: bool = True) -> None:
        super().__init__()
        check_temperature("temperature", temperature)
        self.temperature, self.gather = temperature, gather

    def forward(self, query: Tensor, key: Tensor, negatives: Optional[Tensor] = None) -> Tensor:
        if negatives is not None or not (self.gather and dist.is_distributed() and dist.world_size() > 1):
            return info_nce_loss(query, key, negatives, self.temperature)
        check_same("query", query, "key", key)
        q = F.normalize(query.float(), dim=1)
        k = dist.gather_with_grad(F.normalize(key.float(), dim=1))
        labels = torch.arange(q.shape[0], device=q.device) + dist.rank() * q.shape[0]
        return F.cross_entropy(q @ k.T / self.temperature, labels)
