"""CAPI (Darcet et al. 2025): the online clustering targets and the cross-entropy that both the student and the
clustering head are trained with (facebookresearch/capi, model.py `sinkhorn_knopp` / `OnlineClustering`,
train_capi.py `do_student`).

Position-wise Sinkhorn-Knopp: for teacher cluster logits z (B, L, K) of B images at L patch positions over K
prototypes, every position l is balanced on its own (the paper's fix of positional collapse):

    Q_l = exp(z_l / τ_t − max_b z_l / τ_t)            (B, K), the shift only guards against overflow
    `iterations` times:  Q_l ← Q_l / (Σ_b Q_l + ε)     (each prototype's mass over the batch to 1)
                         Q_l ← Q_l / (Σ_k Q_l + ε)     (each token's assignment to a distribution)

with ε = 1e-8. The loss of predictions p (B, P, K) against assignments q (B, P, K) is the mean over the B·P tokens
of −Σ_k q · log softmax(p / τ_s). Under torchrun the per-position batch sums and maxima are all-reduced, so the
targets are those of the global batch (the reference's `reduced_sum` and `stable_exp`)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_positive_int, check_temperature, full_precision
from ._distributed import active_world, all_reduce_no_grad

SK_EPS = 1e-8  # the reference's eps in both Sinkhorn-Knopp normalisations


def _check_tokens(name: str, x: Tensor) -> None:
    if x.ndim != 3 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty (batch, tokens, clusters) tensor, got shape {tuple(x.shape)}")


@torch.no_grad()
def capi_assignments(logits: Tensor, temperature: float = 0.06, iterations: int = 3,
                     gather_distributed: bool = True) -> Tensor:
    """Position-wise Sinkhorn-Knopp of cluster logits (B, L, K) at teacher temperature `temperature` -> float32
    soft assignments (B, L, K), each token's row a distribution over the K clusters, no gradient. Every position is
    balanced over the batch on its own; with gather_distributed under torchrun, over the global batch."""
    _check_tokens("logits", logits)
    check_temperature("temperature", temperature)
    check_positive_int("iterations", iterations)
    world = active_world(gather_distributed)
    # in place on one fresh (B, L, K) buffer: the B·L·K tensor is the method's largest (16,384 clusters per token)
    q = logits.detach().float().div(temperature)
    shift = q.amax(dim=0, keepdim=True)  # (1, L, K)
    if world > 1:
        shift = all_reduce_no_grad(shift, "max")
    q.sub_(shift).exp_()
    for _ in range(iterations):
        batch_sum = q.sum(dim=0, keepdim=True)  # (1, L, K): each position over the batch
        if world > 1:
            batch_sum = all_reduce_no_grad(batch_sum, "sum")
        q.div_(batch_sum.add_(SK_EPS))
        q.div_(q.sum(dim=2, keepdim=True).add_(SK_EPS))
    return q


def capi_cross_entropy(predictions: Tensor, assignments: Tensor, temperature: float = 0.12) -> Tensor:
    """predictions (B, P, K) cluster logits, assignments (B, P, K) targets (detached here) -> scalar: the mean over
    the B·P tokens of −Σ_k assignment · log softmax(prediction / temperature), in float32.

    Computed by `_SoftTargetCrossEntropy` in one float32 buffer of the logits' size (the clustering head's loss runs
    over every teacher token: B·L·K, 16,384 clusters): the same value and gradient as the chain
    log_softmax → multiply → sum → mean, without keeping its log-probabilities for the backward pass."""
    _check_tokens("predictions", predictions)
    if predictions.shape != assignments.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and assignments {tuple(assignments.shape)} "
                         f"must have the same shape")
    check_temperature("temperature", temperature)
    with full_precision(predictions):
        return _SoftTargetCrossEntropy.apply(predictions, assignments.detach().float(), float(temperature))


class _SoftTargetCrossEntropy(torch.autograd.Function):
    """Mean over the M rows of −Σ_k q · log softmax(z / T), for logits z (..., K) and targets q (..., K) without
    gradient. With s = z / T, lse = logsumexp(s) and m = Σ_k q (1 for assignments):

        loss = mean(m · lse − Σ_k q · s),        ∂loss/∂z = (m · softmax(s) − q) / (M · T).

    Forward and backward each write one float32 buffer of z's size and work in place on it; the backward recomputes
    softmax(s) from z (kept by autograd anyway) instead of saving the log-probabilities."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
        scaled = _scaled_copy(logits, temperature)  # (..., K)
        dot = torch.linalg.vecdot(targets, scaled)  # (...,) Σ_k q · s
        peak = scaled.amax(dim=-1, keepdim=True)
        lse = scaled.sub_(peak).exp_().sum(dim=-1, keepdim=True).log_().add_(peak)  # (..., 1)
        mass = targets.sum(dim=-1, keepdim=True)  # (..., 1)
        ctx.save_for_backward(logits, targets, lse, mass)
        ctx.temperature = temperature
        return (mass * lse).squeeze(-1).sub(dot).mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        logits, targets, lse, mass = ctx.saved_tensors
        temperature = ctx.temperature
        rows = lse.numel()
        g = _scaled_copy(logits, temperature)
        g.sub_(lse).exp_().mul_(mass).sub_(targets).mul_(grad / (rows * temperature))
        return g.to(logits.dtype), None, None


def _scaled_copy(logits: Tensor, temperature: float) -> Tensor:
    """A fresh float32 buffer holding logits / temperature: one allocation whether logits are float32 (divided into
    a new tensor) or half precision (converted, then divided in place)."""
    as_float = logits.float()
    return as_float.div(temperature) if as_float is logits else as_float.div_(temperature)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x (B, L, K), index (B, P) of positions in [0, L) -> (B, P, K), x[b, index[b, p]]."""
    if index.ndim != 2 or index.shape[0] != x.shape[0]:
        raise ValueError(f"index must be (batch, predicted) with batch {x.shape[0]}, got shape {tuple(index.shape)}")
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def capi_loss(student_logits: Tensor, teacher_logits: Tensor, teacher_index: Optional[Tensor] = None,
              teacher_temp: float = 0.06, student_temp: float = 0.12, iterations: int = 3,
              gather_distributed: bool = True) -> Tensor:
    """CAPI's loss. teacher_logits (B, L, K): the clustering head's logits of the teacher's patch tokens, turned
    into position-wise Sinkhorn-Knopp targets (`capi_assignments`, over all L positions); teacher_index (B, P): the
    positions the student predicts, gathered after the balancing (None: student and teacher tokens are aligned,
    P = L); student_logits (B, P, K). -> scalar `capi_cross_entropy` at student_temp. Passing the teacher's logits
    (with their gradient) as student_logits gives the clustering head's own loss (the reference's OnlineClustering,
    pred_temp 0.12)."""
    _check_tokens("teacher_logits", teacher_logits)
    targets = capi_assignments(teacher_logits, teacher_temp, iterations, gather_distributed)
    if teacher_index is not None:
        targets = gather_tokens(targets, teacher_index)
    return capi_cross_entropy(student_logits, targets, student_temp)
