"""DebiasPL (Wang et al. CVPR 2022, "Debiased learning from naturally imbalanced pseudo-labels") on FixMatch, as the
paper's code and USB's `imb_algorithms/debiaspl` add it:

- counterfactual pseudo-labels: the weak view's prediction with the model's own class bias divided out,
  p = softmax(logits_w − τ · log p̂), p̂ the EMA (momentum `ema_p`) of the mean weak-view probabilities over the
  unlabeled batches (all ranks); the confidence gate (threshold + swappable policy) then acts on p;
- the adaptive marginal loss on the strong view: CE(logits_s + τ · log p̂, ŷ) × the gate's weights.

Order within a step, as the paper's code (`main_fixmatch.py`): the pseudo-label and its mask use p̂ before this
batch, p̂ then takes the batch in, and the marginal loss uses the updated p̂. (USB's port differs in three ways we
do not copy: its `delta_p = probs.mean()` averages over classes too, so p̂ stays uniform; the EMA mixes `ema_m`
with `ema_p`; its loss hard-codes τ = 0.4.)"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..common import distributed as dist
from ..data.loader import Batch
from ..losses import adaptive_marginal_loss, debiased_probs, prior_update
from .base import Progress
from .pseudo_gate import PseudoLabelGate
from .registry import register
from .semi import USB_SGD, usb_imbalanced_mu
from .weak_strong import GatedConfig, WeakStrongMethod


class DebiasPLConfig(GatedConfig):
    method: Literal["debiaspl"]

    recommended = USB_SGD
    recommended_source = ("USB classic_cv_imb/fixmatch_debiaspl configs: SGD Nesterov momentum 0.9, lr 0.03 (no "
                          "batch scaling), weight decay 5e-4, lr · cos(7πk/16K)")
    threshold: float = Field(0.95, ge=0, le=1, description="confidence cut-off of the debiased pseudo-label (USB "
                                                           "p_cutoff of its fixmatch_debiaspl configs)")
    tau: float = Field(0.4, ge=0, description="τ: strength of the counterfactual adjustment and of the marginal "
                                              "loss (USB debiaspl_tau; the paper's 0.4)")
    ema_p: float = Field(0.999, ge=0, lt=1, description="EMA momentum of p̂, the mean weak-view prediction (USB "
                                                        "debiaspl_ema_p; the paper's qhat_m)")
    marginal_loss: bool = Field(True, description="adaptive marginal loss on the strong view (the paper); false: "
                                                  "plain cross-entropy (debiased pseudo-labels only)")
    mu: int = usb_imbalanced_mu()

    @model_validator(mode="after")
    def _alignment_is_debiaspls(self) -> "DebiasPLConfig":
        if self.threshold_policy.distribution_alignment:
            raise ValueError("threshold_policy.distribution_alignment: DebiasPL debiases the pseudo-labels itself "
                             "(tau, ema_p); leave it false")
        return self


class CounterfactualAdjustment(nn.Module):
    """The gate's alignment step for DebiasPL: probs (N, K) -> normalise(p ⊙ p̂^(−τ)) = softmax(logits − τ log p̂)
    with p̂ (buffer `prior`, K) from before this batch; p̂ then moves towards the batch's mean raw prediction
    (gathered over ranks; no gradient)."""

    def __init__(self, num_classes: int, tau: float, momentum: float) -> None:
        super().__init__()
        self.tau, self.momentum = tau, momentum
        self.register_buffer("prior", torch.full((num_classes,), 1.0 / num_classes))

    @torch.no_grad()
    def forward(self, probs: Tensor) -> Tensor:
        adjusted = debiased_probs(probs, self.prior, self.tau)
        self.prior.copy_(prior_update(self.prior, dist.gather_no_grad(probs.float()), self.momentum))
        return adjusted

    def observe_labeled(self, probs: Tensor) -> None:
        """p̂ follows the unlabeled predictions only."""


@register("debiaspl", DebiasPLConfig)
class DebiasPL(WeakStrongMethod):
    """DebiasPL: FixMatch whose pseudo-labels are debiased by the model's running class prior p̂ (counterfactual
    logit adjustment) and whose strong-view loss adds τ log p̂ to the logits (adaptive marginal loss)."""

    def build_gate(self, cfg, num_classes: int, num_unlabeled: int) -> PseudoLabelGate:
        return PseudoLabelGate.from_config(cfg, num_classes, num_unlabeled,
                                           CounterfactualAdjustment(num_classes, cfg.tau, cfg.ema_p))

    @property
    def prior(self) -> Tensor:
        """p̂ (K,): the running mean weak-view prediction on unlabeled images."""
        return self.gate.alignment.prior

    def threshold_metrics(self) -> dict:
        return {**super().threshold_metrics(), "debiaspl/prior": [round(float(p), 4) for p in self.prior]}

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        logits_x, logits_w, logits_s = self.forward_views(*self.views(batch))
        supervised = F.cross_entropy(logits_x.float(), batch.y)
        probs, weights = self.gated_pseudo_labels(logits_x, logits_w, batch)  # p̂ is updated in here
        tau = cfg.tau if cfg.marginal_loss else 0.0
        unsupervised = adaptive_marginal_loss(logits_s, probs.argmax(dim=1), self.prior, tau, weights)
        out = {"supervised_loss": supervised.detach(), "unsupervised_loss": unsupervised.detach(),
               "mask_rate": (weights > 0.5).float().mean()}
        return self.finish(supervised + cfg.lambda_u * unsupervised, out, logits_s, weights)
