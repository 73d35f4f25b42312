"""DeFixMatch (Schmutz et al. 2022, "Don't fear the unlabelled: safe semi-supervised learning via debiasing"), as USB
runs it (`defixmatch`): FixMatch whose pseudo-label loss is debiased by the same loss on the labeled batch,
L = ½ (CE(labeled weak) + CE(labeled strong)) + λ_u (L_u − L_u^lab), where L_u^lab trains each labeled image's strong
view towards the pseudo-label of its own weak view, masked by the same confidence gate (`defixmatch_loss`).

Each step draws the weak labeled, weak unlabeled and strong unlabeled views (the family's order), then the strong
labeled view; one joint pass over cat([labeled weak, labeled strong, unlabeled weak, unlabeled strong]) (USB's order).
The labeled batch's pseudo-labels pass the threshold policy's weights at its current state (no update, no
distribution alignment: both track the unlabeled pool)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..data.loader import Batch
from ..losses import defixmatch_loss
from .base import Progress
from .registry import register
from .semi import USB_SGD
from .weak_strong import GatedConfig, WeakStrongMethod


class DeFixMatchConfig(GatedConfig):
    """DeFixMatch keys; defaults from USB's `defixmatch` (algorithm arguments and all its configs, which the paper's
    §5 settings match): p_cutoff 0.95, ulb_loss_ratio 0.5, hard_label True (so its T is unused), uratio 7 (CIFAR)."""

    method: Literal["defixmatch"]

    recommended = USB_SGD
    recommended_source = ("USB's DeFixMatch config (classic_cv, the FixMatch setting): SGD Nesterov momentum 0.9, "
                          "lr 0.03 (no batch scaling), weight decay 5e-4, lr · cos(7πk/16K)")
    threshold: float = Field(0.95, ge=0, le=1, description="confidence cut-off of the pseudo-labels, unlabeled and "
                                                           "labeled (USB p_cutoff)")
    lambda_u: float = Field(0.5, ge=0, description="weight of the debiased term L_u − L_u^lab (USB ulb_loss_ratio, "
                                                   "0.5 in every DeFixMatch config)")


@register("defixmatch", DeFixMatchConfig)
class DeFixMatch(WeakStrongMethod):
    """DeFixMatch: FixMatch's pseudo-label loss minus the same loss on the labeled batch (a debiased, never-worse-than-
    supervised risk), supervised CE on the labeled weak and strong views."""

    def forward_all(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Views of the batch through the classifier -> logits (labeled weak (B, K), labeled strong (B, K), unlabeled
        weak (N, K), unlabeled strong (N, K)); one pass with joint_forward."""
        x, u_weak, u_strong = self.views(batch)
        x_strong = self.strong_view(batch.x)
        logits_labeled, logits_w, logits_s = self.forward_views(torch.cat([x, x_strong]), u_weak, u_strong)
        logits_x, logits_x_strong = logits_labeled.chunk(2)
        return logits_x, logits_x_strong, logits_w, logits_s

    @torch.no_grad()
    def labeled_pseudo_labels(self, logits_x: Tensor) -> tuple[Tensor, Tensor]:
        """The labeled batch's own pseudo-labels: softmax of its weak logits (B, K) weighed by the threshold policy at
        its current state (the policies' weights read no position; the state is not updated).
        -> (probs (B, K), weights (B,)). No gradient."""
        probs = torch.softmax(logits_x.detach().float(), dim=1)
        no_position = torch.full((probs.shape[0],), -1, dtype=torch.long, device=probs.device)
        return probs, self.policy.weights(probs, no_position)

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        logits_x, logits_x_strong, logits_w, logits_s = self.forward_all(batch)
        supervised = 0.5 * (F.cross_entropy(logits_x.float(), batch.y) +
                            F.cross_entropy(logits_x_strong.float(), batch.y))
        probs, weights = self.gated_pseudo_labels(logits_x, logits_w, batch)
        probs_x, weights_x = self.labeled_pseudo_labels(logits_x)
        debiased, unsupervised, anti = defixmatch_loss(logits_s, probs.argmax(dim=1), logits_x_strong,
                                                       probs_x.argmax(dim=1), weights, weights_x)
        out = {"supervised_loss": supervised.detach(), "unsupervised_loss": unsupervised.detach(),
               "labeled_pseudo_loss": anti.detach(), "mask_rate": (weights > 0.5).float().mean(),
               "mask_rate_labeled": (weights_x > 0.5).float().mean()}
        return self.finish(supervised + cfg.lambda_u * debiased, out, logits_s, weights)
