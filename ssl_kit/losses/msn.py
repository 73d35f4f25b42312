"""MSN (Assran et al. 2022, "Masked Siamese Networks") and PMSN (Assran et al. 2023, "The Hidden Uniform Cluster
Prior in Self-Supervised Learning") losses.

Anchor and target embeddings (after the projection head) and K learnable prototypes are L2-normalised; each row's
prototype probabilities are softmax(cos / temperature). The targets' probabilities are sharpened, p^(1/T_s)
renormalised (T_s = target_sharpen_temperature: the reference's `T` 0.25, i.e. a softmax at temperature
0.1 · 0.25 = 0.025), optionally Sinkhorn-normalised, and carry no gradient. Loss = mean over anchor rows of the
cross-entropy −Σ_k t_k log p_k (anchor row i·N + n matches target row n: anchors are view-major) + λ · R(p̄), p̄ the
mean anchor probability:
- "me_max" (MSN): R = −H(p̄) + log K, mean-entropy maximisation (0 at a uniform p̄; the reference adds log K too);
- "power_law" (PMSN): R = KL(prior ‖ p̄) = Σ_k prior_k (log prior_k − log p̄_k), prior_k ∝ k^(−exponent),
  k = 1..K — the direction lightly's PMSNLoss computes (F.kl_div(p̄.log(), prior)).

Under torchrun with gather_distributed, p̄ is the mean over the GLOBAL batch (gradient-carrying all-reduce, as the
reference's AllReduce of avg_probs) and the Sinkhorn sums run over all ranks; each rank's loss is its own
cross-entropy + λ·R(global p̄), so the mean over ranks and the engine-averaged gradient are those of the global batch.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_2d, check_non_negative, check_temperature, full_precision
from ._distributed import active_world, all_reduce_no_grad, all_reduce_sum_with_grad
from .dinov2 import sinkhorn_knopp_centering

REGULARIZATIONS = ("me_max", "power_law", "none")


def power_law_prior(k: int, exponent: float = 0.25, device=None) -> Tensor:
    """PMSN's prior over K prototypes: prior_k ∝ k^(−exponent), k = 1..K, summing to 1. -> float32 (K,)."""
    check_non_negative("power_law_exponent", exponent)
    ranks = torch.arange(1, k + 1, device=device, dtype=torch.float64)
    prior = ranks ** (-float(exponent))
    return (prior / prior.sum()).float()


def _check_args(anchors: Tensor, targets: Tensor, prototypes: Tensor, temperature: float,
                target_sharpen_temperature: float, sinkhorn_iterations: int, regularization: str,
                regularization_weight: float, power_law_exponent: float) -> int:
    check_2d("anchors", anchors)
    check_2d("targets", targets)
    check_2d("prototypes", prototypes)
    check_temperature("temperature", temperature)
    check_temperature("target_sharpen_temperature", target_sharpen_temperature)
    check_non_negative("regularization_weight", regularization_weight)
    check_non_negative("power_law_exponent", power_law_exponent)
    if isinstance(sinkhorn_iterations, bool) or not isinstance(sinkhorn_iterations, int) or sinkhorn_iterations < 0:
        raise ValueError(f"sinkhorn_iterations must be an integer >= 0, got {sinkhorn_iterations!r}")
    if regularization not in REGULARIZATIONS:
        raise ValueError(f"regularization must be one of {REGULARIZATIONS}, got {regularization!r}")
    dims = {anchors.shape[1], targets.shape[1], prototypes.shape[1]}
    if len(dims) != 1:
        raise ValueError(f"anchors, targets and prototypes must share the embedding dimension, got "
                         f"{tuple(anchors.shape)}, {tuple(targets.shape)}, {tuple(prototypes.shape)}")
    if targets.shape[0] == 0 or anchors.shape[0] == 0 or anchors.shape[0] % targets.shape[0]:
        raise ValueError(f"anchors must hold a whole number (>= 1) of views of the targets' batch: got "
                         f"{anchors.shape[0]} anchor rows for {targets.shape[0]} target rows")
    return anchors.shape[0] // targets.shape[0]


@torch.no_grad()
def msn_target_probs(targets: Tensor, prototypes: Tensor, temperature: float = 0.1,
                     target_sharpen_temperature: float = 0.25, sinkhorn_iterations: int = 3,
                     gather_distributed: bool = False) -> Tensor:
    """Targets (N, D) -> sharpened (and Sinkhorn-normalised) prototype probabilities (N, K), float32, no gradient.
    Sinkhorn over all ranks under torchrun with gather_distributed."""
    z = F.normalize(targets.detach().float(), dim=1)
    protos = F.normalize(prototypes.detach().float(), dim=1)
    # softmax(s / T)^(1/T_s), renormalised, is softmax(s / (T · T_s)): computed that way to avoid underflow.
    probs = F.softmax(z @ protos.T / (temperature * target_sharpen_temperature), dim=1)
    if sinkhorn_iterations > 0:
        probs = sinkhorn_knopp_centering(torch.log(probs), 1.0, sinkhorn_iterations, gather_distributed)
    return probs


def msn_regularization(mean_probs: Tensor, regularization: str = "me_max", power_law_exponent: float = 0.25) -> Tensor:
    """R(p̄) for a mean anchor probability p̄ (K,): me_max −H(p̄) + log K; power_law KL(prior ‖ p̄); none 0."""
    if regularization == "none":
        return mean_probs.sum() * 0
    if regularization == "me_max":
        return (mean_probs * torch.log(mean_probs)).sum() + math.log(mean_probs.shape[0])
    prior = power_law_prior(mean_probs.shape[0], power_law_exponent, mean_probs.device)
    return (prior * (torch.log(prior) - torch.log(mean_probs))).sum()


def msn_loss(anchors: Tensor, targets: Tensor, prototypes: Tensor, temperature: float = 0.1,
             target_sharpen_temperature: float = 0.25, sinkhorn_iterations: int = 3,
             regularization: Literal["me_max", "power_law", "none"] = "me_max", regularization_weight: float = 1.0,
             power_law_exponent: float = 0.25, gather_distributed: bool = False) -> Tensor:
    """MSN / PMSN loss. anchors: (V·N, D) projections of V anchor views, view-major (row v·N + n is view v of image
    n); targets: (N, D) target-view projections (no gradient flows to them); prototypes: (K, D). Defaults: the
    reference's and lightly's (temperature 0.1, sharpening 0.25, 3 Sinkhorn iterations, λ = 1, exponent 0.25).
    gather_distributed: under torchrun, p̄ and the Sinkhorn sums span the global batch. -> scalar."""
    views = _check_args(anchors, targets, prototypes, temperature, target_sharpen_temperature, sinkhorn_iterations,
                        regularization, regularization_weight, power_law_exponent)
    with full_precision(anchors):
        protos = F.normalize(prototypes.float(), dim=1)
        log_p = F.log_softmax(F.normalize(anchors.float(), dim=1) @ protos.T / temperature, dim=1)
        target_probs = msn_target_probs(targets, prototypes, temperature, target_sharpen_temperature,
                                        sinkhorn_iterations, gather_distributed).repeat(views, 1)
        loss = -(target_probs * log_p).sum(dim=1).mean()
        if regularization == "none" or regularization_weight == 0:
            return loss
        probs = log_p.exp()
        if active_world(gather_distributed) > 1:
            count = all_reduce_no_grad(probs.new_tensor(float(probs.shape[0])))
            mean_probs = all_reduce_sum_with_grad(probs.sum(dim=0)) / count
        else:
            mean_probs = probs.mean(dim=0)
        return loss + regularization_weight * msn_regularization(mean_probs, regularization, power_law_exponent)


class MSNLoss(nn.Module):
    """msn_loss as a module with its settings; gather_distributed defaults to True (the reference's global-batch
    me-max and Sinkhorn). Single process: exactly msn_loss."""

    def __init__(self, temperature: float = 0.1, target_sharpen_temperature: float = 0.25,
                 sinkhorn_iterations: int = 3, regularization: str = "me_max", regularization_weight: float = 1.0,
                 power_law_exponent: float = 0.25, gather_distributed: bool = True) -> None:
        super().__init__()
        dummy = torch.zeros(1, 1)
        _check_args(dummy, dummy, dummy, temperature, target_sharpen_temperature, sinkhorn_iterations,
                    regularization, regularization_weight, power_law_exponent)
        self.kwargs = dict(temperature=temperature, target_sharpen_temperature=target_sharpen_temperature,
                           sinkhorn_iterations=sinkhorn_iterations, regularization=regularization,
                           regularization_weight=regularization_weight, power_law_exponent=power_law_exponent,
                           gather_distributed=gather_distributed)

    def forward(self, anchors: Tensor, targets: Tensor, prototypes: Tensor) -> Tensor:
        return msn_loss(anchors, targets, prototypes, **self.kwargs)
