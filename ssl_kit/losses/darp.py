"""DARP's refinery (Kim et al. NeurIPS 2020, "Distribution aligning refinery of pseudo-label for imbalanced
semi-supervised learning"): the pseudo-label distributions of the whole unlabeled set are moved, as little as
possible in (entropy-weighted) KL divergence, so that their class totals equal a target class distribution. A pure
function; the bank of pseudo-labels and the schedule live in `methods/darp.py`.

The problem, for pseudo-labels A (N, K) and target class totals c (K,) with Σ_j c_j = N (the paper's eq. 3-5 as its
code `opt_solver` weights it):

    minimise  Σ_i w_i Σ_j M_ij log(M_ij / A_ij)   subject to  Σ_j M_ij = 1 (rows),  Σ_i M_ij = c_j (columns),

w_i = 1 / H(A_i) (H the row's entropy; confident rows move least). Its stationary point is
M_ij = A_ij · exp(−1 − (λ_i + ν_j) / w_i); the dual is solved by coordinate ascent (the paper's Algorithm 1): λ from
the rows in closed form, then each ν_j by Newton's method on its column equation, `num_iter` (T) times; the last
row normalisation makes every row of the result a distribution, the columns meet c as far as T iterations got.
With equal weights this is Sinkhorn's matrix scaling.

Before it, the paper's "removal of noisy entries" (`alpha`): for each class j only the ⌊α·c_j⌋ rows most confident in
j keep their entry (scaled so that these kept entries sum to c_j), every other entry of column j is set to 0 (+1e-6,
then rows renormalised), so a class cannot take its mass from rows that barely predict it.

Differences from the paper's code (and USB's copy), each a numerical guard, not a change of the method: the column
equation Σ_i exp(b_ij − ν_j / w_i) = c_j is solved in log space with the analytic derivative (their scipy secant
method, tol 0.1, on the raw sums overflows for small weights), in float64; the row entropy is clamped at 1e-6 (their
1/H turns negative for an exactly one-hot row, whose entropy with their log(p + 1e-6) is −1e-6)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._checks import check_2d, check_class_vector, check_positive_int

EPS = 1e-6  # the paper's code: added to the kept entries, inside the entropy's log


def _check_target(target: Tensor, k: int) -> None:
    check_class_vector("target", target, k)
    if not bool(torch.isfinite(target).all()) or bool((target <= 0).any()):
        raise ValueError(f"target must be a class distribution with every entry > 0 (finite), got "
                         f"{[round(float(t), 6) for t in target]}")


def darp_target(labeled_counts: Tensor, num_unlabeled: int) -> Tensor:
    """The paper's default target when the unlabeled set is assumed to follow the labeled class distribution: the
    labeled distribution scaled to the unlabeled count, c = N_u · n / Σn. labeled_counts (K,) -> class totals (K,)
    float64 summing to N_u."""
    counts = torch.as_tensor(labeled_counts, dtype=torch.float64)
    if counts.ndim != 1 or bool((counts < 0).any()) or float(counts.sum()) <= 0:
        raise ValueError(f"labeled_counts must be (K,) non-negative counts with a positive sum, got {counts.tolist()}")
    check_positive_int("num_unlabeled", num_unlabeled)
    return counts / counts.sum() * num_unlabeled


def remove_noisy_entries(probs: Tensor, totals: Tensor, alpha: float = 2.0) -> Tensor:
    """The paper's removal of noisy entries (its code's `estimate_pseudo` + rescaling; USB `darp_alpha`): column j
    keeps the ⌊α·c_j⌋ largest entries, scaled by (c_j + 1e-6) / (their sum + 1e-6), every other entry becomes 0;
    then + 1e-6 and rows renormalised. probs (N, K) distributions, totals c (K,) class totals summing to N, alpha > 0.
    -> (N, K) float64 rows summing to 1. No gradient."""
    check_2d("probs", probs)
    n, k = probs.shape
    _check_target(totals, k)
    if isinstance(alpha, bool) or not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ValueError(f"alpha must be a number > 0, got {alpha!r}")
    with torch.no_grad():
        a = probs.detach().to(torch.float64)
        scale = torch.zeros_like(a)
        for j in range(k):
            keep = min(n, int(alpha * float(totals[j])))
            if keep == 0:
                continue
            values, rows = a[:, j].topk(keep)
            scale[rows, j] = (float(totals[j]) + EPS) / (float(values.sum()) + EPS)
        out = a * scale + EPS
        return out / out.sum(dim=1, keepdim=True)


def darp_refine(probs: Tensor, target: Tensor, num_iter: int = 10, alpha: Optional[float] = 2.0,
                num_newton: int = 30) -> Tensor:
    """DARP's refined pseudo-labels of the whole unlabeled set.

    probs (N, K): the pseudo-label distributions (rows ≥ 0 summing to 1; the model's softmax on the weak views);
    target (K,): the target class distribution, any positive scale (normalised here, then × N: the class totals c);
    num_iter: T, coordinate-ascent iterations (USB darp_iter_T 10); alpha: the noisy-entry removal's α (USB darp_alpha
    2.0), None to project `probs` as they are; num_newton: Newton steps per column and iteration (the paper's code 30;
    each stops early once converged).
    -> (N, K) refined distributions, probs' dtype (float32 for anything else): rows sum to 1, column sums ≈ c.
    No gradient; memory O(N·K) in float64."""
    check_2d("probs", probs)
    n, k = probs.shape
    if n == 0:
        raise ValueError("probs must hold at least one row (the unlabeled set's pseudo-labels)")
    _check_target(target, k)
    check_positive_int("num_iter", num_iter)
    check_positive_int("num_newton", num_newton)
    if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()):
        raise ValueError("probs must be finite and non-negative (pseudo-label distributions)")
    with torch.no_grad():
        totals = target.detach().to(device=probs.device, dtype=torch.float64)
        totals = totals / totals.sum() * n
        if alpha is None:
            a = probs.detach().to(torch.float64)
            a = a / a.sum(dim=1, keepdim=True).clamp_min(1e-300)
        else:
            a = remove_noisy_entries(probs, totals, alpha)
        entropy = -(a * torch.log(a + EPS)).sum(dim=1)
        inv_w = entropy.clamp_min(EPS)[:, None]  # 1 / w_i (N, 1)
        log_a = torch.log(a.clamp_min(1e-300)) - 1.0  # log(A / e); an entry of 0 stays (all but) 0
        log_totals = torch.log(totals)
        nu = torch.ones(k, dtype=torch.float64, device=a.device)  # the code's start ν = 1 ...
        for t in range(num_iter):
            log_y = -nu[None, :] * inv_w  # log Y_ij = −ν_j / w_i
            log_x = -torch.logsumexp(log_a + log_y, dim=1, keepdim=True)  # rows: X_i = 1 / Σ_j A_ij/e · Y_ij
            if t == 0:
                nu = torch.zeros_like(nu)  # ... and Newton's first start 0 (prev_Y = zeros)
            base = log_a + log_x  # (N, K): log(A_ij/e · X_i)
            for _ in range(num_newton):  # per column: h_j(ν) = logsumexp_i(base_ij − ν·inv_w_i) − log c_j = 0
                z = base - nu[None, :] * inv_w
                h = torch.logsumexp(z, dim=0) - log_totals  # log(column sum / c_j)
                if float(h.abs().max()) < 1e-10:
                    break
                slope = -(torch.softmax(z, dim=0) * inv_w).sum(dim=0)  # < 0: h is convex and decreasing in ν
                nu = nu - h / slope
        log_y = -nu[None, :] * inv_w
        refined = torch.softmax(log_a + log_y, dim=1)  # M = A/e · X · Y with the last row normalisation
        out_dtype = probs.dtype if probs.dtype.is_floating_point else torch.float32
        return refined.to(out_dtype)
