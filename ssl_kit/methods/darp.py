"""DARP (Kim et al. NeurIPS 2020, "Distribution aligning refinery of pseudo-label for imbalanced semi-supervised
learning") on FixMatch, as the paper's code (`train_fix.py`) and USB's `imb_algorithms/darp` add it:

- a bank keeps the latest weak-view prediction softmax(logits_w) of every unlabeled image, written at the image's
  position in the unlabeled set (`batch.u_index`, gathered over ranks, so every rank holds the same bank);
- after the warm-up (`warmup_epochs` epochs, or by default `warmup_fraction` of the run's steps), every
  `num_refine_iter` steps, the whole bank is refined (`losses/darp.py`): noisy entries removed (`alpha`), then
  the entropy-weighted KL projection onto pseudo-labels whose class totals are the target (`iter_t`
  coordinate-ascent iterations); the target is the labeled class distribution scaled to the
  unlabeled count (the paper's default: the unlabeled set assumed to follow the labeled distribution);
- after warm-up a step's pseudo-labels are the refined rows of its images (the refinery of this step or of the last
  one); FixMatch's confidence gate (threshold + swappable policy) acts on them, the strong view is trained towards
  their argmax. Before warm-up it is FixMatch.

Differences from the references: a refinery runs on the first step after warm-up whatever its number (theirs waits
for a step divisible by num_refine_iter and in between hands out the bank's uniform initial rows, all masked out);
micro-batches of one step share one refinery; the banks are buffers (state dict, exact resume). Like the paper's code,
the mask is the refined pseudo-label's confidence (USB masks on the unrefined prediction). Left out: the paper's
option of a target estimated by another model (`--est`)."""
from __future__ import annotations

import warnings
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..common import distributed as dist
from ..data.loader import Batch
from ..losses import consistency_loss
from ..losses.darp import darp_refine, darp_target
from .abc_balanced import whole_set_counts
from .base import Progress
from .registry import register
from .semi import USB_SGD, usb_imbalanced_mu
from .weak_strong import GatedConfig, WeakStrongMethod


class DARPConfig(GatedConfig):
    method: Literal["darp"]

    recommended = USB_SGD
    recommended_source = ("USB classic_cv_imb/fixmatch_darp configs: SGD Nesterov momentum 0.9, lr 0.03 (no batch "
                          "scaling), weight decay 5e-4, lr · cos(7πk/16K)")
    threshold: float = Field(0.95, ge=0, le=1, description="confidence cut-off of the refined pseudo-label (USB "
                                                           "p_cutoff of its fixmatch_darp configs; the paper's "
                                                           "FixMatch tau 0.95)")
    warmup_epochs: Optional[int] = Field(None, ge=0, description="plain FixMatch until the refinery starts at the "
                                                                 "0-based epoch warmup_epochs + 1, as both references "
                                                                 "count (USB darp_warmup_epochs 200 of 256 epochs, the "
                                                                 "paper's code warm 200 of 500); unset: "
                                                                 "warmup_fraction of the run")
    warmup_fraction: float = Field(200 / 256, ge=0, le=1, description="with warmup_epochs unset: plain FixMatch for "
                                                                      "this fraction of the run's steps (USB's "
                                                                      "proportion, darp_warmup_epochs 200 of 256 "
                                                                      "epochs), so a run of any length refines")
    alpha: float = Field(2.0, gt=0, description="noisy-entry removal: class j keeps its alpha · c_j most confident "
                                                "entries (USB darp_alpha; the paper's code alpha 2.0)")
    iter_t: int = Field(10, ge=1, description="T: coordinate-ascent iterations of the refinery (USB darp_iter_T; the "
                                              "paper's code iter_T 10)")
    num_refine_iter: int = Field(10, ge=1, description="refine the whole bank every this many steps, using the last "
                                                       "refinery in between (USB darp_num_refine_iter; the paper's "
                                                       "code num_iter 10)")
    mu: int = usb_imbalanced_mu()

    @model_validator(mode="after")
    def _alignment_is_darps(self) -> "DARPConfig":
        if self.warmup_epochs is not None and "warmup_fraction" in self.model_fields_set:
            raise ValueError("warmup_epochs and warmup_fraction both set: give the warm-up in epochs or as a fraction "
                             "of the run, not both")
        if self.threshold_policy.distribution_alignment:
            raise ValueError("threshold_policy.distribution_alignment: DARP aligns the pseudo-labels' class "
                             "distribution itself (its refinery); leave it false")
        return self


@register("darp", DARPConfig)
class DARP(WeakStrongMethod):
    """DARP: FixMatch whose pseudo-labels, after warm-up, are those of the whole unlabeled set refined so that their
    class totals follow the labeled class distribution (KL projection with noisy-entry removal)."""

    @classmethod
    def context_from(cls, cfg, data, load_record) -> dict:
        return {**super().context_from(cfg, data, load_record), "labeled_labels": data.train.labels[data.labeled]}

    def __init__(self, cfg, backbone: nn.Module, info, num_unlabeled: int = 0,
                 labeled_labels: Optional[Tensor] = None) -> None:
        super().__init__(cfg, backbone, info, num_unlabeled)
        k = info.num_classes
        counts = whole_set_counts(labeled_labels, k, num_unlabeled, self.name, "the target distribution (the labeled "
                                  "one) would give them no pseudo-label at all")
        self.register_buffer("target", darp_target(counts, num_unlabeled).float())  # c (K,): class totals
        self.register_buffer("bank", torch.full((num_unlabeled, k), 1.0 / k))  # latest weak predictions (N_u, K)
        self.register_buffer("refined", torch.full((num_unlabeled, k), 1.0 / k))  # last refinery's output
        self.register_buffer("refined_step", torch.tensor(-1, dtype=torch.long))  # step of the last refinery
        self._warned = False

    def threshold_metrics(self) -> dict:
        counts = self.refined.sum(dim=0) if int(self.refined_step) >= 0 else self.bank.sum(dim=0)
        return {**super().threshold_metrics(), "darp/refined_step": int(self.refined_step),
                "darp/pseudo_label_totals": [round(float(c), 1) for c in counts]}

    def refining(self, progress: Progress) -> bool:
        """Whether the refined pseudo-labels are in use (after warm-up: warmup_epochs epochs, else warmup_fraction
        of the run's steps)."""
        if self.cfg.warmup_epochs is not None:
            return progress.epoch > self.cfg.warmup_epochs
        return progress.step >= self.cfg.warmup_fraction * progress.total_steps

    @torch.no_grad()
    def pseudo_labels(self, probs: Tensor, index: Tensor, progress: Progress) -> Tensor:
        """probs (N, K) weak-view predictions of the unlabeled images at positions index (N,) -> their pseudo-label
        distributions (N, K): probs during warm-up, then the refined rows. The bank takes every rank's probs in
        first; the refinery runs on the first step after warm-up and then every num_refine_iter steps."""
        if index is None:
            raise ValueError("darp needs the unlabeled images' positions (batch.u_index) for its bank")
        self.bank[dist.gather_no_grad(index.long())] = dist.gather_no_grad(probs.float()).to(self.bank.dtype)
        if not self.refining(progress):
            self._warn_if_never(progress)
            return probs
        step = progress.step
        due = int(self.refined_step) < 0 or step % self.cfg.num_refine_iter == 0
        if due and int(self.refined_step) != step:
            self.refined.copy_(darp_refine(self.bank, self.target, self.cfg.iter_t, self.cfg.alpha))
            self.refined_step.fill_(step)
        return self.refined[index].to(probs.dtype)

    def _warn_if_never(self, progress: Progress) -> None:
        last = Progress(step=max(1, progress.total_steps) - 1, total_steps=progress.total_steps,
                        epoch=(max(1, progress.total_steps) - 1) // max(1, progress.steps_per_epoch),
                        steps_per_epoch=progress.steps_per_epoch)
        if not self._warned and not self.refining(last):
            self._warned = True
            warnings.warn(f"darp: the warm-up (warmup_epochs {self.cfg.warmup_epochs}, warmup_fraction "
                          f"{self.cfg.warmup_fraction}) covers the whole run ({last.epoch + 1} epochs of "
                          f"{progress.steps_per_epoch} steps): the refinery never runs and this trains as FixMatch; "
                          f"lower it (USB: 200 of 256 epochs)")

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        logits_x, logits_w, logits_s = self.forward_views(*self.views(batch))
        supervised = F.cross_entropy(logits_x.float(), batch.y)
        with torch.no_grad():
            self.gate.observe_labeled(torch.softmax(logits_x.detach().float(), dim=1))
            probs = self.pseudo_labels(torch.softmax(logits_w.detach().float(), dim=1), batch.u_index, progress)
            weights = self.gate.weigh(probs, batch.u_index)
            self.track_pseudo_labels(probs, weights, batch.u_y)
        unsupervised = consistency_loss(logits_s, probs.argmax(dim=1), weights)
        out = {"supervised_loss": supervised.detach(), "unsupervised_loss": unsupervised.detach(),
               "mask_rate": (weights > 0.5).float().mean(),
               "darp_refining": torch.tensor(float(self.refining(progress)), device=supervised.device)}
        return self.finish(supervised + cfg.lambda_u * unsupervised, out, logits_s, weights)
