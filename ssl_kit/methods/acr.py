"""ACR (Wei & Gan CVPR 2023, "Towards realistic long-tailed semi-supervised learning: consistency is all you need"),
as USB's `imb_algorithms/acr` implements it: two heads on the shared features, each with its own consistency.

- standard branch (`standard_head`): CE on the labeled batch; its strong view is trained towards the weak view's
  pseudo-label with the labeled prior π taken out at an adaptive intensity τ, softmax(logits_w − log(π^τ)), where
  that pseudo-label or the unadjusted one is confident (≥ threshold);
- balanced branch (`head`, the one evaluated and saved, as USB's ACR evaluates `logits_aux`): logit-adjusted CE on
  the labeled batch, CE(logits + log(π^τ2), y); its strong view is trained towards softmax(logits_w − log(π^τ12)) of
  the standard branch, where that or its own weak prediction is confident;
- τ adapts to the unlabeled distribution: after `est_epoch` epochs, the balanced branch's confident weak predictions
  give a class histogram, p̂_u ← ema_u · p̂_u + (1 − ema_u) · histogram (gathered over ranks); each step adds the
  symmetric KL of p̂_u to the anchors consistent (π), uniform and reversed (π flipped); at the next epoch,
  τ = τ_min + (τ_max − τ_min) · softmax(mean distances)_consistent (τ_max = tau1, τ_min = 0).

Differences from USB, each where its code does not do what it evidently means: the histogram is a bincount
(USB's `now_mask[targets] += mask` writes repeated indices once); τ is not re-estimated after an epoch that
estimated nothing (USB sets τ = τ_max / 3 from an all-zero sum at epoch est_epoch + 1); the sums are checkpointed,
so a resumed run continues exactly. Like USB, one strong view per image (the paper's code draws two)."""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..common import distributed as dist
from ..data.loader import Batch
from ..losses import (acr_tau, adjusted_pseudo_labels, anchor_distances, consistency_loss, logit_adjusted_loss,
                      logit_adjustment)
from .abc_balanced import BalancedHeadMethod
from .base import Progress
from .registry import register
from .semi import USB_SGD, usb_imbalanced_mu
from .weak_strong import WeakStrongConfig


class ACRConfig(WeakStrongConfig):
    method: Literal["acr"]

    recommended = USB_SGD
    recommended_source = ("ACR (Wei & Gan 2023) / USB classic_cv_imb settings: SGD Nesterov momentum 0.9, lr 0.03 "
                          "(no batch scaling), weight decay 5e-4, lr · cos(7πk/16K)")
    threshold: float = Field(0.95, ge=0, le=1, description="confidence cut-off of every pseudo-label mask (USB "
                                                           "p_cutoff, the ACR code's threshold 0.95)")
    tau1: float = Field(2.0, ge=0, description="τ_max: intensity of the standard branch's pseudo-label adjustment "
                                               "before and at most after estimation (USB tau1)")
    tau12: float = Field(2.0, ge=0, description="fixed intensity of the balanced branch's pseudo-label adjustment "
                                                "(USB tau12)")
    tau2: float = Field(2.0, ge=0, description="intensity of the balanced branch's logit-adjusted labeled loss (USB "
                                               "tau2)")
    est_epoch: int = Field(5, ge=0, description="epochs before the unlabeled distribution is estimated (USB "
                                                "est_epoch)")
    ema_u: float = Field(0.9, ge=0, lt=1, description="EMA momentum of the estimated unlabeled class distribution "
                                                      "(USB ema_u)")
    mu: int = usb_imbalanced_mu()


@register("acr", ACRConfig)
class ACR(BalancedHeadMethod):
    """ACR: a standard and a balanced head; the standard head's pseudo-labels are debiased by logit adjustment at an
    intensity τ set by how far the unlabeled class distribution is from the labeled one (consistent, uniform or
    reversed); the balanced head is evaluated."""

    def __init__(self, cfg, backbone: nn.Module, info, num_unlabeled: int = 0,
                 labeled_labels: Optional[Tensor] = None) -> None:
        super().__init__(cfg, backbone, info, num_unlabeled, labeled_labels)
        counts = self.labeled_counts
        k = info.num_classes
        self.register_buffer("labeled_prior", counts / counts.sum())  # π (K,)
        self.register_buffer("tau", torch.tensor(float(cfg.tau1)))  # τ of the standard branch's adjustment
        self.register_buffer("unlabeled_estimate", torch.full((k,), 1.0 / k))  # p̂_u (K,)
        self.register_buffer("distance_sum", torch.zeros(3))  # Σ over this epoch's steps of [d_con, d_uni, d_rev]
        self.register_buffer("distance_steps", torch.zeros(()))
        self.register_buffer("epoch", torch.tensor(-1, dtype=torch.long))  # the epoch the sums belong to

    def threshold_metrics(self) -> dict:
        return {"acr/tau": float(self.tau), "acr/unlabeled_estimate": [round(float(p), 4)
                                                                       for p in self.unlabeled_estimate]}

    def adjustment(self, tau) -> Tensor:
        """log(π^τ + 1e-12) (K,) of the labeled prior π."""
        return logit_adjustment(self.labeled_prior, float(tau))

    @torch.no_grad()
    def begin_epoch(self, epoch: int) -> None:
        """On the first step of a new epoch: after est_epoch, τ from the mean anchor distances of the epoch before
        (when it estimated anything); the sums restart."""
        if int(self.epoch) == epoch:
            return
        if epoch > self.cfg.est_epoch and float(self.distance_steps) > 0:
            tau = acr_tau(self.distance_sum / self.distance_steps, 0.0, self.cfg.tau1)
            if torch.isfinite(tau):
                self.tau.copy_(tau)
        self.distance_sum.zero_()
        self.distance_steps.zero_()
        self.epoch.fill_(epoch)

    @torch.no_grad()
    def estimate(self, pseudo_balanced: Tensor, confident: Tensor) -> None:
        """One step of the unlabeled estimate: the histogram of the balanced head's confident pseudo-labels (N,)
        (gathered over ranks), normalised, moves p̂_u; the anchor distances of p̂_u are summed for the epoch."""
        k = self.info.num_classes
        histogram = torch.bincount(dist.gather_no_grad(pseudo_balanced), weights=dist.gather_no_grad(
            confident.float()), minlength=k).float()
        if histogram.sum() <= 0:
            return
        m = self.cfg.ema_u
        self.unlabeled_estimate.mul_(m).add_((1 - m) * histogram / histogram.sum())
        self.distance_sum.add_(anchor_distances(self.unlabeled_estimate, self.labeled_prior))
        self.distance_steps.add_(1)

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        self.begin_epoch(progress.epoch)
        (logits_x, bal_x), (logits_w, bal_w), (logits_s, bal_s) = self.forward_views(*self.views(batch),
                                                                                    network=self.net.both)
        supervised = F.cross_entropy(logits_x.float(), batch.y)
        supervised_balanced = logit_adjusted_loss(bal_x, batch.y, self.adjustment(cfg.tau2))
        with torch.no_grad():
            cut = cfg.threshold
            probs = adjusted_pseudo_labels(logits_w, self.adjustment(self.tau))  # standard, adaptive τ
            probs_h2 = adjusted_pseudo_labels(logits_w, self.adjustment(cfg.tau12))  # for the balanced branch
            probs_b = torch.softmax(bal_w.detach().float(), dim=1)
            probs_t = torch.softmax(logits_w.detach().float(), dim=1)
            confident = {name: p.max(dim=1).values >= cut for name, p in
                         (("adjusted", probs), ("h2", probs_h2), ("balanced", probs_b), ("raw", probs_t))}
            mask = (confident["adjusted"] | confident["raw"]).float()
            mask_b = (confident["balanced"] | confident["h2"]).float()
            if progress.epoch > cfg.est_epoch:
                self.estimate(probs_b.argmax(dim=1), confident["balanced"])
        self.track_pseudo_labels(probs, mask, batch.u_y)
        unsupervised = consistency_loss(logits_s, probs.argmax(dim=1), mask)
        unsupervised_balanced = consistency_loss(bal_s, probs_h2.argmax(dim=1), mask_b)
        loss = supervised + supervised_balanced + cfg.lambda_u * (unsupervised + unsupervised_balanced)
        out = {"supervised_loss": supervised.detach(), "unsupervised_loss": unsupervised.detach(),
               "balanced_supervised_loss": supervised_balanced.detach(),
               "balanced_unsupervised_loss": unsupervised_balanced.detach(), "mask_rate": mask.mean(),
               "tau": self.tau.detach().clone()}
        return self.finish(loss, out, logits_s, mask)
