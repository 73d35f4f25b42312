"""CReST / CReST+ (Wei et al. CVPR 2021, "CReST: A class-rebalancing self-training framework for imbalanced
semi-supervised learning"): the pure parts. The bank of predictions, the generations and the extra loss live in
`methods/crest.py`.

- Class-rebalancing selection. Classes are ranked by their labeled count, most frequent first: N_1 ≥ ... ≥ N_K. At a
  generation's end, the unlabeled images pseudo-labeled as the class of rank l are sorted by confidence and the
  first ⌊n_l · μ_l⌋ join the labeled set, with the sampling rate

      μ_l = (N_{K+1-l} / N_1)^(1/alpha)

  so the rarest class keeps all its pseudo-labels (μ_K = 1) and the most frequent one the fraction
  (N_K / N_1)^(1/alpha). The paper writes the exponent as α = 1/3; its code (`--alpha 3`, `pow(rate, 1 / alpha)`)
  and USB (`crest_alpha 3`) take its inverse, as `alpha` does here.
- Progressive distribution alignment (CReST+): the weak-view prediction p of an unlabeled image becomes
  normalise(p · (π^t / Σπ^t + 1e-6) / (p̄ + 1e-6)), π the labeled class distribution, p̄ the running mean prediction,
  with a temperature t moving linearly from 1 (generation 0: align to π itself) to t_min (last generation: a
  flatter target, rebalancing more).

Differences from the references (their code and USB's `imb_algorithms/crest`): the classes are ranked by the measured
labeled counts, and μ_l is computed from them (both references assume the class index is the frequency rank and take
the rates from the exponential profile N_1 · γ^(-(l-1)/(K-1)) fitted to the head and tail counts; equal for such a
split); the floor ⌊n_l · μ_l⌋ has a 1e-9 slack so that a product that is an integer is not lost to rounding; ties in
confidence keep the lower position first."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._checks import check_2d, check_class_vector, check_positive_int
from .remixmatch import remixmatch_distribution_alignment

FLOOR_SLACK = 1e-9


def _counts(labeled_counts: Tensor) -> Tensor:
    counts = torch.as_tensor(labeled_counts, dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() == 0 or not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise ValueError(f"labeled_counts must be (K,) finite non-negative counts, got "
                         f"{counts.tolist() if counts.ndim <= 1 else tuple(counts.shape)}")
    if float(counts.max()) <= 0:
        raise ValueError("labeled_counts must have a positive entry (the most frequent class)")
    return counts


def frequency_rank(labeled_counts: Tensor) -> Tensor:
    """labeled_counts (K,) -> (K,) int64: each class's rank by labeled count, 0 = the most frequent (ties: lower
    class index first)."""
    counts = _counts(labeled_counts)
    order = torch.sort(-counts, stable=True).indices  # classes, most frequent first
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return rank


def crest_sampling_rates(labeled_counts: Tensor, alpha: float = 3.0) -> Tensor:
    """CReST's per-class sampling rates μ. labeled_counts (K,): labeled images per class (any non-negative numbers,
    the largest > 0); alpha > 0 (USB crest_alpha 3; the paper's exponent is 1/alpha). -> (K,) float64 in [0, 1]: the
    class of frequency rank l (1-based, most frequent first) gets (N_{K+1-l} / N_1)^(1/alpha)."""
    counts = _counts(labeled_counts)
    if isinstance(alpha, bool) or not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    rank = frequency_rank(counts)
    descending = torch.sort(counts, descending=True, stable=True).values
    mirrored = descending.flip(0)  # rank l -> N_{K+1-l}
    return (mirrored[rank] / descending[0]) ** (1.0 / alpha)


def crest_select(confidence: Tensor, prediction: Tensor, rates: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """The class-rebalancing selection of pseudo-labeled images.

    confidence (N,): max softmax probability of each unlabeled image; prediction (N,) int64: its argmax class;
    rates (K,): per-class sampling rates (`crest_sampling_rates`); valid (N,) bool, optional: images that may be
    chosen (False: no prediction yet). For each class c, of the n_c valid images predicted as c the ⌊n_c · rates_c⌋
    most confident are chosen (equal confidence: lower position first).
    -> (N,) bool: chosen images (their pseudo-label is `prediction`). No gradient."""
    if not hasattr(confidence, "ndim") or confidence.ndim != 1:
        raise ValueError(f"confidence must be a 1-D tensor (N,), got shape {tuple(getattr(confidence, 'shape', ()))}")
    n = confidence.shape[0]
    if not hasattr(prediction, "shape") or tuple(prediction.shape) != (n,) or prediction.dtype.is_floating_point:
        raise ValueError(f"prediction must be an integer tensor of shape ({n},) like confidence, got "
                         f"{tuple(getattr(prediction, 'shape', ()))} {getattr(prediction, 'dtype', None)}")
    if not hasattr(rates, "ndim") or rates.ndim != 1:
        raise ValueError(f"rates must be a 1-D tensor (K,), got shape {tuple(getattr(rates, 'shape', ()))}")
    k = rates.shape[0]
    if bool((rates < 0).any()) or bool((rates > 1).any()) or not bool(torch.isfinite(rates).all()):
        raise ValueError(f"rates must be in [0, 1], got {[round(float(r), 6) for r in rates]}")
    if valid is None:
        valid = torch.ones(n, dtype=torch.bool, device=confidence.device)
    elif tuple(valid.shape) != (n,) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor of shape ({n},), got {tuple(valid.shape)} {valid.dtype}")
    if n and bool(((prediction < 0) | (prediction >= k))[valid].any()):
        raise ValueError(f"prediction must hold class indices in [0, {k}) where valid")
    with torch.no_grad():
        chosen = torch.zeros(n, dtype=torch.bool, device=confidence.device)
        order = torch.sort(confidence.detach().double(), descending=True, stable=True).indices
        order = order[valid[order]]  # valid images, most confident first
        classes = prediction[order].long()
        grouped = torch.sort(classes, stable=True)  # by class, each class still most confident first
        members = torch.bincount(classes, minlength=k)  # n_c (K,)
        first = torch.cumsum(members, 0) - members  # where each class's run starts in the grouped order
        place = torch.arange(len(order), device=order.device) - first[grouped.values]  # 0-based rank in its class
        keep = torch.floor(members.double() * rates.to(members.device).double() + FLOOR_SLACK).long()
        chosen[order[grouped.indices][place < keep[grouped.values]]] = True
        return chosen


def progressive_temperature(generation: int, num_gens: int, t_min: float = 0.5) -> float:
    """CReST+'s alignment temperature of a generation: 1 at generation 0, linearly down to t_min at the last one
    (num_gens − 1); 1 when there is one generation. generation in [0, num_gens)."""
    check_positive_int("num_gens", num_gens)
    if isinstance(generation, bool) or not isinstance(generation, int) or not 0 <= generation < num_gens:
        raise ValueError(f"generation must be an integer in [0, {num_gens}), got {generation!r}")
    if isinstance(t_min, bool) or not (isinstance(t_min, (int, float)) and 0 <= t_min <= 1):
        raise ValueError(f"t_min must be in [0, 1], got {t_min!r}")
    if num_gens == 1:
        return 1.0
    done = generation / (num_gens - 1)
    return (1.0 - done) * 1.0 + done * float(t_min)


def tempered_target(target: Tensor, temperature: float) -> Tensor:
    """target (K,) class distribution (entries ≥ 0, positive sum) -> target^temperature normalised (K,)."""
    if not hasattr(target, "ndim") or target.ndim != 1 or bool((target < 0).any()) or float(target.sum()) <= 0:
        raise ValueError("target must be a (K,) class distribution (non-negative, positive sum)")
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    powered = target ** temperature
    return powered / powered.sum()


def progressive_alignment(probs: Tensor, p_model: Tensor, target: Tensor, temperature: float) -> Tensor:
    """CReST+'s distribution alignment. probs (N, K) pseudo-label distributions; p_model (K,) the running mean
    prediction on the unlabeled images; target (K,) the labeled class distribution; temperature t ≥ 0.
    -> (N, K) normalise(probs · (target^t / Σ target^t + 1e-6) / (p_model + 1e-6)), rows summing to 1: ReMixMatch's
    alignment towards the tempered target (no gradient)."""
    check_2d("probs", probs)
    check_class_vector("target", target, probs.shape[1], " of probs")
    return remixmatch_distribution_alignment(probs, p_model, tempered_target(target.to(probs.dtype), temperature))


def generation_of(step: int, total_steps: int, num_gens: int) -> int:
    """The generation (0-based) a 0-based step of a run of total_steps falls in, the run cut into num_gens equal
    parts: ⌊step · num_gens / total_steps⌋, at most num_gens − 1."""
    check_positive_int("num_gens", num_gens)
    total = max(1, int(total_steps))
    return min(num_gens - 1, max(0, int(step)) * num_gens // total)
