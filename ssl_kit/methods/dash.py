"""Dash (Xu et al. 2021), as USB runs it (`dash`): after a labeled-only warm-up, an unlabeled image is used while
the model's cross-entropy against its own weak-view pseudo-label is below ρ_t = max(ρ_min, C · γ^−stage · ρ̂),
which shrinks by γ every `rho_update_every` steps; ρ̂ is the mean supervised loss over the last `rho_window`
warm-up steps (USB evaluates the loss on its evaluation set instead; we never look at held-out data). Targets are
softmax(weak / T) until ρ_t reaches ρ_min, hard labels after; the strong view is trained towards them. The dynamic
threshold is a ThresholdPolicy object (`DashThreshold`) with its state in buffers, so resume is exact."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..data.loader import Batch
from ..losses import consistency_loss, dash_threshold, dash_weak_loss
from .base import Progress
from .pseudo_gate import PseudoLabelGate
from .registry import register
from .semi import USB_SGD
from .thresholds import ThresholdPolicy
from .weak_strong import WeakStrongConfig, WeakStrongMethod


class DashConfig(WeakStrongConfig):
    method: Literal["dash"]

    recommended = USB_SGD
    recommended_source = ("USB's Dash config: SGD Nesterov momentum 0.9, lr 0.03 (no batch scaling), weight decay 5e-4, lr · cos(7πk/16K)")
    temperature: float = Field(0.5, gt=0, description="soft pseudo-label softmax(weak / T) (USB T)")
    gamma: float = Field(1.27, ge=1, description="ρ shrinks by this factor per stage (USB gamma)")
    c: float = Field(1.0001, gt=0, description="ρ_t = max(rho_min, c · gamma^−stage · ρ̂) (USB C)")
    rho_min: float = Field(0.05, ge=0, description="floor of ρ; hard pseudo-labels once reached (USB rho_min)")
    warmup_steps: int = Field(2048, ge=1, description="labeled-only steps before ρ̂ is set (USB num_wu_iter)")
    rho_window: int = Field(100, ge=1, description="ρ̂ = mean supervised loss of the last this-many warm-up steps "
                                                   "(USB num_wu_eval_iter)")
    rho_update_every: int = Field(10240, ge=1, description="steps per ρ stage (USB: every 10 epochs of 1024 "
                                                           "iterations)")


class DashThreshold(ThresholdPolicy):
    """Dash's dynamic loss threshold as a policy. `observe_supervised(loss, step)` during warm-up collects ρ̂;
    `schedule(step)` sets ρ_t for the step; `weights(probs)` = 1 where CE(weak, own pseudo-label) ≤ ρ_t
    (the rule of `dash_mask` on `dash_weak_loss`, ρ_t kept on the device; soft targets until ρ_t = ρ_min, then hard)."""

    def __init__(self, num_classes: int, temperature: float, gamma: float, c: float, rho_min: float,
                 warmup_steps: int, rho_window: int, update_every: int) -> None:
        super().__init__()
        self.num_classes, self.temperature, self.gamma, self.c = num_classes, temperature, gamma, c
        self.rho_min, self.warmup_steps, self.update_every = rho_min, warmup_steps, update_every
        self.window_start = max(0, warmup_steps - rho_window)
        self.register_buffer("loss_sum", torch.zeros(()))
        self.register_buffer("loss_count", torch.zeros(()))
        self.register_buffer("rho", torch.tensor(float("inf")))

    @torch.no_grad()
    def observe_supervised(self, loss: Tensor, step: int) -> None:
        """A warm-up step's mean supervised cross-entropy (kept for ρ̂ inside the window)."""
        if self.window_start <= step < self.warmup_steps:
            self.loss_sum += loss.detach().float()
            self.loss_count += 1

    def rho_init(self) -> Tensor:
        """ρ̂: the mean supervised loss of the warm-up window."""
        return self.loss_sum / self.loss_count.clamp_min(1)

    @torch.no_grad()
    def schedule(self, step: int) -> None:
        """ρ_t for optimizer step `step` ≥ warmup_steps: max(ρ_min, C γ^−stage ρ̂), stage = ⌊(step − warm-up)
        / update_every⌋ (`dash_threshold` with ρ̂ = 1 gives the factor; ρ̂ stays a device tensor, no sync)."""
        factor = dash_threshold(step - self.warmup_steps, 1.0, self.gamma, self.c, 0.0, self.update_every)
        self.rho.copy_(torch.clamp_min(factor * self.rho_init(), self.rho_min))

    def hard(self) -> Tensor:
        return self.rho <= self.rho_min

    def targets(self, probs: Tensor) -> Tensor:
        """Pseudo-label distributions (N, K): softmax(weak / T) (= sharpened probs), one-hot once ρ_t = ρ_min."""
        log_probs = torch.log(probs.float().clamp_min(1e-30))
        soft = torch.softmax(log_probs / self.temperature, dim=1)
        one_hot = F.one_hot(probs.argmax(dim=1), self.num_classes).float()
        return torch.where(self.hard(), one_hot, soft)

    def weights(self, probs: Tensor, index: Tensor) -> Tensor:
        log_probs = torch.log(probs.float().clamp_min(1e-30))  # logits up to a constant: same softmax
        per_sample = torch.where(self.hard(), dash_weak_loss(log_probs, self.temperature, hard_label=True),
                                 dash_weak_loss(log_probs, self.temperature, hard_label=False))
        return (per_sample <= self.rho).float()

    def thresholds(self) -> Tensor:
        return self.rho.expand(self.num_classes).clone()


@register("dash", DashConfig)
class Dash(WeakStrongMethod):
    """Dash: after a labeled-only warm-up, unlabeled samples train while their own pseudo-label loss is below a
    threshold ρ_t that shrinks by γ per stage (soft targets, then hard ones). Its gate is `DashThreshold`."""

    def build_gate(self, cfg, num_classes: int, num_unlabeled: int) -> PseudoLabelGate:
        return PseudoLabelGate(DashThreshold(num_classes, cfg.temperature, cfg.gamma, cfg.c, cfg.rho_min,
                                             cfg.warmup_steps, cfg.rho_window, cfg.rho_update_every))

    def threshold_metrics(self) -> dict:
        return {"pseudo/rho": float(self.policy.rho)}

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        if progress.step < cfg.warmup_steps:  # labeled-only warm-up (USB trains on the labeled loader alone)
            supervised = F.cross_entropy(self.net(self.weak_view(batch.x)).float(), batch.y)
            self.policy.observe_supervised(supervised, progress.step)
            return {"loss": supervised, "supervised_loss": supervised.detach()}
        logits_x, logits_w, logits_s = self.forward_views(*self.views(batch))
        supervised = F.cross_entropy(logits_x.float(), batch.y)
        self.policy.schedule(progress.step)
        probs, weights = self.gated_pseudo_labels(logits_x, logits_w, batch)
        unsupervised = consistency_loss(logits_s, self.policy.targets(probs), weights)
        return {"loss": supervised + cfg.lambda_u * unsupervised, "supervised_loss": supervised.detach(),
                "unsupervised_loss": unsupervised.detach(), "mask_rate": weights.mean(),
                "dash/rho": self.policy.rho.clone()}
