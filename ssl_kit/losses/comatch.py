"""CoMatch (Li, Xiong & Hoi, ICCV 2021, "CoMatch: semi-supervised learning with contrastive graph
regularization"), as USB implements it (semilearn/algorithms/comatch/comatch.py): memory-smoothed pseudo-labels,
the pseudo-label graph W^q and the graph-contrastive loss between two strong views' embeddings.

Shapes: embeddings (N, D) L2-normalised by the caller (the projection head's output), bank_embeddings (M, D) and
bank_probs (M, K) the memory bank (weak embeddings and class probabilities of past labeled + unlabeled images),
probs (N, K) the weak view's class probabilities (after distribution alignment)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_2d, check_temperature, check_unit_interval


def comatch_memory_smoothing(probs: Tensor, embeddings: Tensor, bank_embeddings: Tensor, bank_probs: Tensor,
                             temperature: float = 0.2, smoothing_alpha: float = 0.9) -> Tensor:
    """Memory-smoothed pseudo-labels, without gradient (CoMatch eq. 3; USB's "memory-smoothing"):
    a = softmax(embeddings @ bank_embeddingsᵀ / T) (N, M), p̂ = α · probs + (1 − α) · a @ bank_probs (N, K),
    α = smoothing_alpha (USB 0.9), T = temperature (USB config T 0.2). α = 1 returns probs. -> (N, K)."""
    check_2d("probs", probs)
    check_2d("embeddings", embeddings)
    check_2d("bank_embeddings", bank_embeddings)
    check_2d("bank_probs", bank_probs)
    if embeddings.shape[0] != probs.shape[0]:
        raise ValueError(f"probs and embeddings must have the same number of rows N, got {tuple(probs.shape)} and "
                         f"{tuple(embeddings.shape)}")
    if bank_embeddings.shape[1] != embeddings.shape[1]:
        raise ValueError(f"embeddings and bank_embeddings must have the same dimension D, got "
                         f"{tuple(embeddings.shape)} and {tuple(bank_embeddings.shape)}")
    if bank_probs.shape != (bank_embeddings.shape[0], probs.shape[1]):
        raise ValueError(f"bank_probs must have shape (M, K) = {(bank_embeddings.shape[0], probs.shape[1])}, got "
                         f"{tuple(bank_probs.shape)}")
    if bank_embeddings.shape[0] == 0:
        raise ValueError("bank_embeddings is empty: memory smoothing needs at least one bank entry")
    check_temperature("temperature", temperature)
    check_unit_interval("smoothing_alpha", smoothing_alpha)
    with torch.no_grad():
        p = probs.detach().float()
        affinity = torch.softmax(embeddings.detach().float() @ bank_embeddings.detach().float().T / temperature, 1)
        return smoothing_alpha * p + (1.0 - smoothing_alpha) * affinity @ bank_probs.detach().float()


def comatch_pseudo_label_graph(probs: Tensor, cutoff: float = 0.8) -> Tensor:
    """The pseudo-label graph W^q (CoMatch eq. 5), without gradient: W = probs @ probsᵀ (N, N), self-loops set to 1,
    entries below `cutoff` (USB contrast_p_cutoff 0.8) set to 0, rows normalised to sum 1. -> (N, N)."""
    check_2d("probs", probs)
    check_unit_interval("cutoff", cutoff)
    with torch.no_grad():
        p = probs.detach().float()
        graph = p @ p.T
        graph.fill_diagonal_(1.0)
        graph = graph * (graph >= cutoff).float()
        return graph / graph.sum(dim=1, keepdim=True)


def comatch_contrastive_loss(embeddings_a: Tensor, embeddings_b: Tensor, graph: Tensor,
                             temperature: float = 0.2) -> Tensor:
    """CoMatch's graph-contrastive loss L^c (eq. 8): the embedding graph W^z = row-softmax(a @ bᵀ / T) of two
    strong views (N, D) each, trained towards the pseudo-label graph W^q (N, N, no gradient) by cross-entropy,
    −Σ_j W^q_ij log W^z_ij, averaged over i. T = temperature (USB passes its T, 0.2 in the config). -> scalar."""
    check_2d("embeddings_a", embeddings_a)
    check_2d("embeddings_b", embeddings_b)
    check_2d("graph", graph)
    if embeddings_a.shape != embeddings_b.shape:
        raise ValueError(f"embeddings_a and embeddings_b must have the same shape, got {tuple(embeddings_a.shape)} "
                         f"and {tuple(embeddings_b.shape)}")
    n = embeddings_a.shape[0]
    if tuple(graph.shape) != (n, n):
        raise ValueError(f"graph must have shape (N, N) = {(n, n)}, got {tuple(graph.shape)}")
    check_temperature("temperature", temperature)
    log_sim = F.log_softmax(embeddings_a.float() @ embeddings_b.float().T / temperature, dim=1)
    return -(graph.detach().float() * log_sim).sum(dim=1).mean()
