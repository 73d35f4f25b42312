"""Supervised contrastive loss (Khosla et al. 2020, the "L_out" form: the mean over positives is outside the log).

Every view of every sample is an anchor; its positives are the other views of its own sample and all views of
samples with the same label; the softmax runs over every view except the anchor itself. Samples with a negative
label are unlabelled: their only positives are their own other views (SimCLR-style), so labelled and unlabelled
samples can share a batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common import distributed as dist
from ._checks import check_temperature, full_precision
from ._distributed import active_world, all_reduce_no_grad


def _check(features: Tensor, labels: Tensor, temperature: float) -> None:
    if not hasattr(features, "ndim") or features.ndim != 3:
        raise ValueError(f"features must be a 3-D tensor (N, V, D) of V views per sample, got shape "
                         f"{tuple(getattr(features, 'shape', ()))}")
    if not hasattr(labels, "ndim") or labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels must have shape ({features.shape[0]},) (one per sample), got "
                         f"{tuple(getattr(labels, 'shape', ()))}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers (negative = unlabelled), got {labels.dtype}")
    if labels.device != features.device:
        raise ValueError(f"labels are on {labels.device} but features are on {features.device}")
    check_temperature("temperature", temperature)


def _flatten(features: Tensor) -> Tensor:
    """(N, V, D) -> (N·V, D) L2-normalised, sample-major (row n·V + v is view v of sample n)."""
    n, v, d = features.shape
    return F.normalize(features.float().reshape(n * v, d), dim=1)


def _anchor_losses(contrast: Tensor, sample_ids: Tensor, labels: Tensor, start: int, count: int,
                   temperature: float) -> tuple[Tensor, Tensor]:
    """contrast (C, D) normalised rows with their sample ids and labels (C,); anchors are rows start..start+count.
    -> (per-anchor loss (count,), has a positive (count,) bool). An anchor without positives has loss 0."""
    anchors = contrast[start:start + count]
    with full_precision(contrast):
        logits = anchors @ contrast.T / temperature  # (count, C)
    rows = torch.arange(count, device=contrast.device)
    own = rows + start
    logits[rows, own] = float("-inf")
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    a_ids, a_labels = sample_ids[own], labels[own]
    positive = (a_ids[:, None] == sample_ids[None, :]) | (
        (a_labels[:, None] == labels[None, :]) & (a_labels[:, None] >= 0))
    positive[rows, own] = False
    n_positive = positive.sum(dim=1)
    mean_log_prob = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(dim=1) / n_positive.clamp(min=1)
    return -mean_log_prob, n_positive > 0


def _no_positive_error(n: int, v: int) -> ValueError:
    return ValueError(f"supcon_loss: no anchor has a positive (N={n} samples with V={v} view(s) and no two sharing "
                      f"a non-negative label); use V ≥ 2 views or repeated labels")


def supcon_loss(features: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """Supervised contrastive loss, L_out. features: (N, V, D) V views per sample, not normalised (L2-normalised
    here); labels: (N,) integers, negative = unlabelled (positives are then only the sample's own other views).
    For each of the N·V anchors i with positives P(i) (same sample or same label, not i itself) and
    A(i) = every view but i: loss_i = −1/|P(i)| Σ_{p∈P(i)} log(exp(s_ip/τ) / Σ_{a∈A(i)} exp(s_ia/τ)) with cosine
    similarities s. Averaged over the anchors that have at least one positive (all of them when V ≥ 2); a batch
    where none has one is a ValueError. No base-temperature factor (SupContrast's τ/τ_base is 1 here). -> scalar."""
    _check(features, labels, temperature)
    n, v, _ = features.shape
    if n * v < 2:
        raise ValueError(f"supcon_loss needs at least 2 views in all, got N={n}, V={v}")
    ids = torch.arange(n, device=features.device).repeat_interleave(v)
    losses, has_positive = _anchor_losses(_flatten(features), ids, labels.repeat_interleave(v), 0, n * v,
                                          temperature)
    count = int(has_positive.sum())
    if count == 0:
        raise _no_positive_error(n, v)
    return losses.sum() / count


class SupConLoss(nn.Module):
    """supcon_loss over the global batch. Under torchrun (gather_distributed and > 1 ranks, each holding n samples)
    this rank's n·V anchors are contrasted with every rank's views (gathered with gradients; labels gathered too),
    and the sum of their losses is divided by the global number of anchors with a positive, times the world size:
    the mean over ranks and the engine-averaged gradient equal supcon_loss on the global batch."""

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = True) -> None:
        super().__init__()
        check_temperature("temperature", temperature)
        self.temperature, self.gather_distributed = temperature, gather_distributed

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        """features: (n, V, D) this rank's views; labels: (n,) integers. -> scalar."""
        world = active_world(self.gather_distributed)
        if world == 1:
            return supcon_loss(features, labels, self.temperature)
        _check(features, labels, self.temperature)
        n, v, _ = features.shape
        contrast = dist.gather_with_grad(_flatten(features))
        all_labels = dist.gather_no_grad(labels).repeat_interleave(v)
        ids = torch.arange(world * n, device=features.device).repeat_interleave(v)
        losses, has_positive = _anchor_losses(contrast, ids, all_labels, dist.rank() * n * v, n * v,
                                              self.temperature)
        count = int(all_reduce_no_grad(has_positive.sum()))
        if count == 0:
            raise _no_positive_error(world * n, v)
        return losses.sum() * world / count
