"""DINOv2 (Oquab et al. 2023) loss terms beside DINO's and iBOT's: the KoLeo regulariser, the two ways of turning
teacher logits into targets (Sinkhorn-Knopp or DINO's softmax centring), and the [CLS] / masked-patch cross-entropies
against those target probabilities.

KoLeo (Sablayrolles et al. 2019) spreads a batch's features: −mean log(distance of each L2-normalised row to its
nearest neighbour). DINOv2's reference computes it per GPU on each global crop's [CLS] features (no all-gather), so
`KoLeoLoss` defaults to the rank's own rows; `gather_distributed=True` looks for neighbours in the global batch.

Sinkhorn-Knopp centring replaces DINO's running centre: the teacher's exp(logits / T) is normalised alternately so
that every prototype receives the same mass over the batch and every row sums to 1 (3 iterations). The sums over
the batch run over all ranks (all-reduce), as in DINOv2's reference, so the targets are those of the global batch.

Gram anchoring (DINOv3, Siméoni et al. 2025) keeps patch features local late in training: the student's patch-to-patch
cosine similarities (its Gram matrix, per image) are pulled to those of an earlier copy of the teacher, `gram_loss`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common import distributed as dist
from ._checks import check_2d, check_batch, check_positive_int, check_temperature, check_views, full_precision
from ._distributed import active_world, all_reduce_no_grad


def _check_eps(eps: float) -> None:
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a number > 0, got {eps!r}")


def _nearest_neighbour_terms(queries: Tensor, pool: Tensor, own_rows: Tensor, eps: float) -> Tensor:
    """−log(‖q − nearest other row of pool‖ + eps) per query. queries (n, D), pool (M, D), both L2-normalised;
    own_rows (n,): each query's own index in pool, which is never its neighbour. -> (n,)."""
    with torch.no_grad():
        similarity = queries @ pool.T
        similarity[torch.arange(queries.shape[0], device=queries.device), own_rows] = -2.0  # below any cosine
        nearest = similarity.argmax(dim=1)
    distances = F.pairwise_distance(queries, pool[nearest], p=2, eps=eps)
    return -torch.log(distances + eps)


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """KoLeo regulariser. x: (N, D) features, N ≥ 2, L2-normalised here. For each row the nearest other row by
    cosine similarity; loss = −mean_i log(‖x_i − x_nn(i)‖ + eps) (the distance is torch's pairwise_distance with
    eps, as in DINOv2's reference and lightly). Lower when the rows spread out. -> scalar."""
    check_2d("x", x)
    check_batch("koleo_loss", x, 2)
    _check_eps(eps)
    with full_precision(x):
        z = F.normalize(x.float(), dim=-1, eps=eps)
        return _nearest_neighbour_terms(z, z, torch.arange(z.shape[0], device=z.device), eps).mean()


class KoLeoLoss(nn.Module):
    """koleo_loss as a module. By default (gather_distributed=False) each rank's rows find their neighbours among that
    rank's rows only — DINOv2's reference (dinov2/loss/koleo_loss.py has no all-gather), so the regulariser's
    strength depends on the per-GPU batch as there. With gather_distributed=True under torchrun (> 1 ranks, n rows
    each) the normalised rows are all-gathered with gradients and each of this rank's rows finds its neighbour in
    the global batch: the mean over ranks and the engine-averaged gradient equal koleo_loss on the global batch.
    Single process: exactly koleo_loss."""

    def __init__(self, eps: float = 1e-8, gather_distributed: bool = False) -> None:
        super().__init__()
        _check_eps(eps)
        self.eps, self.gather_distributed = eps, gather_distributed

    def forward(self, x: Tensor) -> Tensor:
        """x: (n, D) this rank's features. -> scalar."""
        if active_world(self.gather_distributed) == 1:
            return koleo_loss(x, self.eps)
        check_2d("x", x)
        check_batch("KoLeoLoss", x, 1)
        with full_precision(x):
            z = F.normalize(x.float(), dim=-1, eps=self.eps)
            pool = dist.gather_with_grad(z)
            own_rows = dist.rank() * z.shape[0] + torch.arange(z.shape[0], device=z.device)
            return _nearest_neighbour_terms(z, pool, own_rows, self.eps).mean()


@torch.no_grad()
def sinkhorn_knopp_centering(teacher_logits: Tensor, teacher_temp: float, iterations: int = 3,
                             gather_distributed: bool = True) -> Tensor:
    """DINOv2's Sinkhorn-Knopp teacher targets. teacher_logits: (M, K) logits of M samples (the [CLS] tokens of
    both global crops, or the masked patch tokens) over K prototypes. Q = exp(logits / teacher_temp)ᵀ, scaled to sum
    1, then `iterations` times: every prototype's row to 1/K, every sample's column to 1/B, with B the number of
    samples; returns B·Qᵀ: (M, K) float32 probabilities, each row sums to 1, no gradient.
    Under torchrun (gather_distributed and > 1 ranks) the total and the per-prototype sums are all-reduced and B is
    the all-reduced sample count, so the targets equal those of the global batch; the ranks may hold different M
    (masked patches), including none. The global maximum of the logits is subtracted before exp (it cancels in the
    normalisation; it only prevents overflow)."""
    check_2d("teacher_logits", teacher_logits)
    check_temperature("teacher_temp", teacher_temp)
    check_positive_int("iterations", iterations)
    world = active_world(gather_distributed)
    reduce_sum = (lambda v: all_reduce_no_grad(v, "sum")) if world > 1 else (lambda v: v)
    logits = teacher_logits.detach().float() / teacher_temp
    peak = logits.max() if logits.numel() else logits.new_tensor(float("-inf"))
    if world > 1:
        peak = all_reduce_no_grad(peak, "max")
    q = torch.exp(logits - peak).T  # (K, M)
    samples = reduce_sum(logits.new_tensor(float(logits.shape[0])))
    if float(samples) == 0:
        return q.T
    prototypes = q.shape[0]
    q /= reduce_sum(q.sum())
    for _ in range(iterations):
        q /= reduce_sum(q.sum(dim=1, keepdim=True))
        q /= prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= samples
    return (q * samples).T


@torch.no_grad()
def softmax_centering(teacher_logits: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """DINO's teacher targets: softmax((logits − center) / teacher_temp) over the last dimension. teacher_logits:
    (..., K); center: K entries. -> float32 probabilities of the same shape, no gradient."""
    check_temperature("teacher_temp", teacher_temp)
    k = teacher_logits.shape[-1]
    if center.numel() != k:
        raise ValueError(f"center must have {k} entries, got shape {tuple(center.shape)}")
    return F.softmax((teacher_logits.detach().float() - center.detach().float().view(k)) / teacher_temp, dim=-1)


def _check_probs_like(name: str, probs: Tensor, logits_name: str, logits: Tensor) -> None:
    if probs.shape != logits.shape:
        raise ValueError(f"{name} must have the shape of {logits_name} {tuple(logits.shape)}, got "
                         f"{tuple(probs.shape)}")


def dinov2_cls_loss(student_logits: list[Tensor], teacher_probs: list[Tensor], student_temp: float = 0.1) -> Tensor:
    """DINO's [CLS] cross-entropy against teacher target probabilities (from `sinkhorn_knopp_centering` or
    `softmax_centering`): −Σ_k p_t log softmax(s / student_temp), averaged over the batch and over all (teacher view
    i, student view j) pairs with i ≠ j (the student's global views come first, in the teacher's order).
    student_logits: list of (N, K); teacher_probs: list of (N, K), no gradient. -> scalar."""
    if not student_logits or not teacher_probs:
        raise ValueError("dinov2_cls_loss needs at least one student view and one teacher view")
    check_temperature("student_temp", student_temp)
    check_views([("student_logits", student_logits), ("teacher_probs", teacher_probs)], "teacher_probs[0]",
                teacher_probs[0].shape)
    pairs = [(i, j) for i in range(len(teacher_probs)) for j in range(len(student_logits)) if i != j]
    if not pairs:
        raise ValueError("dinov2_cls_loss needs a (teacher i, student j) pair with i != j: give 2 views or more")
    log_probs = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_logits]
    total = sum(-(teacher_probs[i].detach().float() * log_probs[j]).sum(dim=-1).mean() for i, j in pairs)
    return total / len(pairs)


def dinov2_patch_loss(student_patch_logits: Tensor, teacher_patch_probs: Tensor, mask: Tensor,
                      student_temp: float = 0.1) -> Tensor:
    """iBOT's masked-patch cross-entropy as DINOv2 computes it, on the masked tokens only.
    mask: (N, L), 1/True = masked; student_patch_logits, teacher_patch_probs: (M, K) for the M masked tokens in
    mask.nonzero() order (image-major), teacher rows already centred probabilities (no gradient). Each token's
    CE −Σ_k p_t log softmax(s / student_temp) is weighted 1 / (masked tokens of its image); the sum is divided by N
    (every image counts, an unmasked one with 0). -> scalar."""
    check_2d("student_patch_logits", student_patch_logits)
    _check_probs_like("teacher_patch_probs", teacher_patch_probs, "student_patch_logits", student_patch_logits)
    check_temperature("student_temp", student_temp)
    check_2d("mask", mask)
    masked = mask.detach() > 0
    if int(masked.sum()) != student_patch_logits.shape[0]:
        raise ValueError(f"mask has {int(masked.sum())} masked tokens but student_patch_logits has "
                         f"{student_patch_logits.shape[0]} rows: give one row per masked token")
    per_image = masked.sum(dim=1, keepdim=True).clamp(min=1).float()
    weights = (1.0 / per_image).expand_as(masked)[masked]  # (M,)
    log_probs = F.log_softmax(student_patch_logits.float() / student_temp, dim=-1)
    per_token = -(teacher_patch_probs.detach().float() * log_probs).sum(dim=-1)
    return (per_token * weights).sum() / mask.shape[0]


def _check_patches(name: str, x: Tensor) -> None:
    if not hasattr(x, "ndim") or x.ndim != 3:
        raise ValueError(f"{name} must be a 3-D tensor (B, P, D), got shape {tuple(getattr(x, 'shape', ()))}")


def _gram(patches: Tensor, normalize: bool, remove_negative: bool) -> Tensor:
    """Per-image Gram matrices: patches (B, P, D) -> (B, P, P) float32 inner products of the (L2-normalised when
    `normalize`) patch features; entries below 0 set to 0 when `remove_negative`."""
    x = patches.float()
    if normalize:
        x = F.normalize(x, dim=-1)
    gram = x @ x.transpose(-1, -2)
    return gram.clamp(min=0.0) if remove_negative else gram


def gram_loss(student_patches: Tensor, teacher_patches: Tensor, normalize: bool = True,
              remove_negative: bool = False) -> Tensor:
    """DINOv3's Gram anchoring loss (dinov3/loss/gram_loss.py, GramLoss with img_level=True): the mean squared error
    between the per-image Gram matrices of the student's and the Gram teacher's patch features,
    mean over b, i, j of (x̂_S,bi · x̂_S,bj − x̂_G,bi · x̂_G,bj)², i.e. ‖X_S X_Sᵀ − X_G X_Gᵀ‖_F² / (B · P²) summed over
    the B images. student_patches, teacher_patches: (B, P, D) patch features of B images (P patches, D channels),
    L2-normalised along D here when `normalize` (the reference's gram.normalized: true); `remove_negative` sets
    negative similarities of both Gram matrices to 0 first (gram.remove_neg, false in the reference's configs).
    The teacher side takes no gradient. Computed in float32. -> scalar."""
    _check_patches("student_patches", student_patches)
    _check_patches("teacher_patches", teacher_patches)
    if student_patches.shape != teacher_patches.shape:
        raise ValueError("student_patches and teacher_patches must have the same shape, got "
                         f"{tuple(student_patches.shape)} and {tuple(teacher_patches.shape)}")
    with full_precision(student_patches):
        target = _gram(teacher_patches.detach(), normalize, remove_negative)
        return F.mse_loss(_gram(student_patches, normalize, remove_negative), target)
