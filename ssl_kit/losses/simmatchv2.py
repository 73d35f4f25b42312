"""SimMatchV2 (Zheng et al., ICCV 2023, "SimMatchV2: semi-supervised learning with graph consistency"), as its
reference code computes it (github.com/mingkai-zheng/SimMatchV2, models/simmatchv2.py): each augmented view of an
image is a node (a label and an L2-normalised embedding), and nodes are joined by edges (their similarities).

- edge-node consistency, `simmatchv2_label_propagation`: the pseudo-label of a weak unlabeled node is propagated
  over a small graph of that node and its `topn` nearest labeled-bank nodes (closed-form label propagation,
  (1 − α) · (I − α · A)⁻¹ · Y, row of the unlabeled node);
- node-node consistency: the strong view's class prediction trained towards that propagated pseudo-label where the
  teacher is confident (the method uses `consistency_loss` with the confidence mask as weights);
- node-edge consistency, `simmatchv2_node_edge_loss`: the strong view's edges to the unlabeled bank, aggregated
  over the bank's class predictions, trained towards the teacher's class prediction;
- edge-edge consistency, `simmatchv2_edge_edge_loss`: the strong view's edges to the unlabeled bank trained towards
  the weak (teacher) view's edges.

Shapes: embeddings (N, D) and banks (M, D) are L2-normalised by the caller (projection head output; the banks hold
a teacher's weak-view embeddings), probabilities (N, K) / (M, K) rows summing to 1 (a bank's unwritten rows may be
0), labels (M,) class indices in [0, K). The similarities are computed in float32 (autocast off inside)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import (check_2d, check_labels, check_positive_int, check_temperature, check_unit_interval,
                      full_precision)


def _check_embeddings_and_bank(name: str, embeddings: Tensor, bank_name: str, bank: Tensor) -> None:
    check_2d(name, embeddings)
    check_2d(bank_name, bank)
    if embeddings.shape[1] != bank.shape[1]:
        raise ValueError(f"{name} and {bank_name} must have the same dimension D, got {tuple(embeddings.shape)} and "
                         f"{tuple(bank.shape)}")
    if bank.shape[0] == 0:
        raise ValueError(f"{bank_name} is empty: SimMatchV2 needs at least one bank row")


def simmatchv2_label_propagation(embeddings: Tensor, probs: Tensor, bank: Tensor, bank_labels: Tensor,
                                 topn: int = 128, temperature: float = 0.1, alpha: float = 0.1) -> Tensor:
    """SimMatchV2's propagated pseudo-labels (edge-node consistency), without gradient.

    For each weak unlabeled node n: its n' = min(topn, M) nearest labeled-bank rows by cosine similarity (reference
    --topn 128); the graph of n' + 1 nodes [embeddings[n]; neighbours] with labels Y = [probs[n]; one-hot labels]
    ((n' + 1, K)); the affinity A = row-softmax(G Gᵀ / T with the diagonal removed) (G the (n' + 1, D) node
    embeddings, T = temperature, reference --t 0.1); and the closed-form propagation F = (1 − α) (I − α A)⁻¹ Y
    (α = alpha, reference --alpha 0.1). Returns row 0 of F per node: (N, K), rows summing to 1 (A is
    row-stochastic); alpha = 0 returns probs.

    embeddings: (N, D) weak (teacher) embeddings; probs: (N, K) their class probabilities (after distribution
    alignment); bank: (M, D) labeled embeddings; bank_labels: (M,) their classes. -> (N, K)."""
    _check_embeddings_and_bank("embeddings", embeddings, "bank", bank)
    check_2d("probs", probs)
    if probs.shape[0] != embeddings.shape[0]:
        raise ValueError(f"probs must have one row per embedding, got {tuple(probs.shape)} for embeddings "
                         f"{tuple(embeddings.shape)}")
    check_labels("bank_labels", bank_labels, bank.shape[0], probs.shape[1])
    check_positive_int("topn", topn)
    check_temperature("temperature", temperature)
    check_unit_interval("alpha", alpha)
    if alpha >= 1.0:
        raise ValueError(f"alpha must be in [0, 1) (I − α·A is singular at α = 1), got {alpha!r}")
    with torch.no_grad(), full_precision(embeddings):  # float32 similarities and solve under autocast
        z, p, b = embeddings.detach().float(), probs.detach().float(), bank.detach().float()
        n, k = z.shape[0], p.shape[1]
        top = min(topn, b.shape[0])
        nearest = torch.topk(z @ b.T, k=top, dim=1).indices  # (N, n')
        nodes = torch.cat([z.unsqueeze(1), b[nearest]], dim=1)  # (N, n' + 1, D)
        one_hot = F.one_hot(bank_labels.long()[nearest], k).float()  # (N, n', K)
        labels = torch.cat([p.unsqueeze(1), one_hot], dim=1)  # (N, n' + 1, K)
        eye = torch.eye(top + 1, device=z.device)
        affinity = (nodes @ nodes.transpose(1, 2) / temperature).masked_fill(eye.bool(), float("-inf"))
        affinity = torch.softmax(affinity, dim=2)  # (N, n' + 1, n' + 1), no self-loops
        propagated = (1.0 - alpha) * torch.linalg.solve(eye - alpha * affinity, labels)  # (N, n' + 1, K)
        return propagated[:, 0].reshape(n, k)


def simmatchv2_edge_edge_loss(student_embeddings: Tensor, teacher_embeddings: Tensor, bank: Tensor,
                              temperature: float = 0.1) -> Tensor:
    """SimMatchV2's edge-edge consistency L_ee: the strong view's edges to the unlabeled bank,
    softmax(student_embeddings @ bankᵀ / T) (N, M), trained towards the weak (teacher) view's,
    softmax(teacher_embeddings @ bankᵀ / T) (no gradient), by cross-entropy −Σ_m q_m log p_m summed over the bank and
    averaged over N. T = temperature (reference --t 0.1). The bank and the teacher get no gradient.
    student_embeddings, teacher_embeddings: (N, D); bank: (M, D). -> scalar."""
    _check_embeddings_and_bank("student_embeddings", student_embeddings, "bank", bank)
    if teacher_embeddings.shape != student_embeddings.shape:
        raise ValueError(f"teacher_embeddings must have the shape of student_embeddings "
                         f"{tuple(student_embeddings.shape)}, got {tuple(teacher_embeddings.shape)}")
    check_temperature("temperature", temperature)
    with full_precision(student_embeddings):  # float32 similarities under autocast
        b = bank.detach().float()
        with torch.no_grad():
            target = torch.softmax(teacher_embeddings.detach().float() @ b.T / temperature, dim=1)
        log_p = F.log_softmax(student_embeddings.float() @ b.T / temperature, dim=1)
        return -(target * log_p).sum(dim=1).mean()


def simmatchv2_node_edge_loss(student_embeddings: Tensor, bank: Tensor, bank_probs: Tensor, targets: Tensor,
                              temperature: float = 0.1) -> Tensor:
    """SimMatchV2's node-edge consistency L_ne: the strong view's edges to the unlabeled bank,
    a = softmax(student_embeddings @ bankᵀ / T) (N, M), aggregate the bank's class predictions into a class
    distribution a @ bank_probs (N, K), trained towards `targets` (the teacher's aligned class probabilities, no
    gradient) by cross-entropy −Σ_k targets_k log (a @ bank_probs)_k, averaged over N. T = temperature (reference
    --t 0.1). The bank gets no gradient. Non-finite when a class has no mass in bank_probs where targets has some
    (an unwritten bank of zero rows): the reference then drops the term, and so does the method.
    student_embeddings: (N, D); bank: (M, D); bank_probs: (M, K); targets: (N, K). -> scalar."""
    _check_embeddings_and_bank("student_embeddings", student_embeddings, "bank", bank)
    check_2d("bank_probs", bank_probs)
    check_2d("targets", targets)
    if bank_probs.shape[0] != bank.shape[0]:
        raise ValueError(f"bank_probs must have one row per bank row (M = {bank.shape[0]}), got "
                         f"{tuple(bank_probs.shape)}")
    if tuple(targets.shape) != (student_embeddings.shape[0], bank_probs.shape[1]):
        raise ValueError(f"targets must have shape (N, K) = {(student_embeddings.shape[0], bank_probs.shape[1])}, "
                         f"got {tuple(targets.shape)}")
    check_temperature("temperature", temperature)
    with full_precision(student_embeddings):  # float32 similarities under autocast
        edges = torch.softmax(student_embeddings.float() @ bank.detach().float().T / temperature, dim=1)
        aggregated = edges @ bank_probs.detach().float()  # (N, K)
        return -(targets.detach().float() * aggregated.log()).sum(dim=1).mean()
