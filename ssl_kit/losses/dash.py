"""Dash (Xu et al. 2021, "Dash: semi-supervised learning with dynamic thresholding"): an unlabeled sample is used
while the model's loss on its own pseudo-label is below a threshold ρ_t that decays geometrically.

Usage (USB `dash`): warm up on labeled data, set ρ̂ (`rho_init`) = the mean supervised cross-entropy at the end of
the warm-up; then each step mask = dash_mask(dash_weak_loss(logits_weak, T, hard), dash_threshold(step, ρ̂, ...)),
with hard pseudo-labels once ρ_t has reached `rho_min`, and the consistency loss is masked by it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_2d, check_temperature


def _positive(name: str, value: float, strict: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > 0 if strict else value >= 0)
    if not ok:
        raise ValueError(f"{name} must be a number {'>' if strict else '>='} 0, got {value!r}")


def dash_threshold(step: int, rho_init: float, gamma: float = 1.27, c: float = 1.0001, rho_min: float = 0.05,
                   update_every: int = 1) -> float:
    """ρ_t = max(rho_min, C · γ^−(t−1) · ρ̂) with stage t − 1 = ⌊step / update_every⌋ (the Dash paper; USB's
    DashThresholdingHook, whose `rho_update_cnt` starts at 0 on step 0 and grows every 10 epochs of iterations,
    `gamma` 1.27, `C` 1.0001, `rho_min` 0.05). rho_init is ρ̂, the mean supervised loss after the warm-up.
    update_every: optimizer steps per stage (USB: 10 · iterations per epoch); with 1, `step` counts stages.
    γ > 1 makes ρ_t decrease, so ever fewer, ever more certain samples pass. -> float."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ValueError(f"update_every must be an integer >= 1, got {update_every!r}")
    _positive("rho_init", rho_init)
    _positive("c", c)
    _positive("rho_min", rho_min, strict=False)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma < 1:
        raise ValueError(f"gamma must be a number >= 1 (ρ must not grow), got {gamma!r}")
    stage = step // update_every
    return max(rho_min, c * gamma ** (-stage) * rho_init)


def dash_weak_loss(logits_weak: Tensor, temperature: float = 0.5, hard_label: bool = False) -> Tensor:
    """The per-sample loss Dash thresholds: cross-entropy of the weak-view logits against their own pseudo-label,
    soft softmax(weak / T) (USB `T` 0.5) or, with hard_label, the argmax. No gradient (it only selects samples).
    logits_weak: (N, K). -> (N,)."""
    check_2d("logits_weak", logits_weak)
    check_temperature("temperature", temperature)
    with torch.no_grad():
        logits = logits_weak.detach().float()
        log_probs = F.log_softmax(logits, dim=1)
        if hard_label:
            return -log_probs.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)
        return -(torch.softmax(logits / temperature, dim=1) * log_probs).sum(dim=1)


def dash_mask(per_sample_loss: Tensor, rho: float) -> Tensor:
    """1 where the sample's loss ≤ ρ (kept), else 0. per_sample_loss: (N,). -> float mask (N,), no gradient."""
    if not hasattr(per_sample_loss, "ndim") or per_sample_loss.ndim != 1:
        raise ValueError(f"per_sample_loss must be a 1-D tensor (N,), got shape "
                         f"{tuple(getattr(per_sample_loss, 'shape', ()))}")
    _positive("rho", rho, strict=False)
    return (per_sample_loss.detach() <= rho).float()
