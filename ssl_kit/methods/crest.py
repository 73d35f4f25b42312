"""CReST / CReST+ (Wei et al. CVPR 2021, "CReST: A class-rebalancing self-training framework for imbalanced
semi-supervised learning") on FixMatch, as the paper's code (google-research/crest) and USB's `imb_algorithms/crest`
add it.

The references train in generations: each generation is a whole FixMatch training (USB: `num_train_iter` steps, the
model, its EMA, the optimizer and the schedule built anew, `re_init`); at its end the EMA model predicts every
unlabeled image, and for the next generation the labeled set is the original one plus, per class, the most confident
fraction μ_l of the images pseudo-labeled as that class (`losses/crest.py`: μ_l = (N_{K+1-l} / N_1)^(1/alpha), rarer
classes take more). The selection is not cumulative: each generation adds the last one's choice. CReST+ also aligns
the weak-view pseudo-labels to the labeled class distribution raised to a temperature going from 1 (generation 0) to
`alignment_t_min` (last generation).

Here the generations share one run of the loop: the run's steps are cut into `num_gens` equal parts (generation g
holds steps ⌊g·T/G⌋ ... ⌊(g+1)·T/G⌋ − 1), so a run of any length has its generations; the model, EMA, optimizer and
schedule go on across the boundaries (one schedule for the whole run; the references re-initialise and repeat the
whole schedule per generation, G times the compute). The loader's labeled set is fixed, so the enlarged labeled set is
trained inside the method: the unlabeled images chosen at the last boundary keep their frozen pseudo-label (a
buffer), and the rows of a step's unlabeled batch that are chosen get a supervised cross-entropy on their weak view
(the labeled images' augmentation), mixed with the labeled loss in the proportion the enlarged set would give it:
(1 − f) · CE(labeled) + f · CE(chosen rows), f = N_chosen / (N_labeled + N_chosen) (the expectation of the
references' labeled loss over a uniform draw from the enlarged set; f = 0 in a step without a chosen row). As in both
references, chosen images stay in the unlabeled stream too.

The pseudo-labels of the whole unlabeled set at a boundary come from a bank, as DARP's (`methods/darp.py`): the raw
(unaligned) weak-view prediction of every unlabeled image at its last visit — confidence and class — written at its
position `batch.u_index`, gathered over ranks so every rank holds the same bank and makes the same choice. The
references instead run the EMA model over the un-augmented unlabeled set at the generation's end. An image never
visited has no prediction and is not chosen (a warning says how many). Bank, choice, generation and the alignment's
running mean are buffers (state dict, exact resume)."""
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
from ..losses.crest import crest_sampling_rates, crest_select, generation_of, progressive_alignment, \
    progressive_temperature
from .abc_balanced import whole_set_counts
from .base import Progress
from .pseudo_gate import PseudoLabelGate
from .registry import register
from .semi import USB_SGD, usb_imbalanced_mu
from .weak_strong import GatedConfig, WeakStrongMethod


class CReSTConfig(GatedConfig):
    method: Literal["crest"]

    recommended = USB_SGD
    recommended_source = ("USB classic_cv_imb/fixmatch_crest and fixmatch_crest+ configs: SGD Nesterov momentum "
                          "0.9, lr 0.03 (no batch scaling), weight decay 5e-4, lr · cos(7πk/16K)")
    threshold: float = Field(0.95, ge=0, le=1, description="FixMatch's confidence cut-off of the (aligned) weak-view "
                                                           "pseudo-label (USB p_cutoff of its fixmatch_crest configs; "
                                                           "the paper's code threshold 0.95)")
    num_gens: int = Field(6, ge=1, description="generations: the run's steps cut into this many equal parts, the "
                                               "labeled set re-chosen at each boundary (USB crest_num_gens 6; the "
                                               "paper's code README --num_generation=6 for CIFAR-10-LT)")
    alpha: float = Field(3.0, gt=0, description="sampling strength: the class of frequency rank l keeps the "
                                                "(N_{K+1-l}/N_1)^(1/alpha) most confident of its pseudo-labels (USB "
                                                "crest_alpha 3; the paper's code --alpha 3, the paper's α = 1/3)")
    progressive_alignment: bool = Field(True, description="CReST+: align pseudo-labels to the labeled class "
                                                          "distribution at a temperature going from 1 to "
                                                          "alignment_t_min over the generations (USB "
                                                          "crest_pro_dist_align: true in its fixmatch_crest+ "
                                                          "configs, false in fixmatch_crest); false: CReST")
    alignment_t_min: float = Field(0.5, ge=0, le=1, description="the alignment temperature of the last generation "
                                                                "(USB crest_dist_align_t 0.5; the paper's code "
                                                                "--dalign_t 0.5)")
    ema_p: float = Field(0.999, gt=0, lt=1, description="EMA momentum of the running mean unlabeled prediction the "
                                                        "alignment divides by (USB DistAlignEMAHook momentum 0.999, "
                                                        "started at the first batch's mean)")
    mu: int = usb_imbalanced_mu()

    @model_validator(mode="after")
    def _one_alignment(self) -> "CReSTConfig":
        if self.progressive_alignment and self.threshold_policy.distribution_alignment:
            raise ValueError("threshold_policy.distribution_alignment: with progressive_alignment (CReST+) the "
                             "pseudo-labels are already aligned to the labeled distribution; leave it false, or set "
                             "progressive_alignment false for CReST with the gate's own alignment")
        return self


class ProgressiveAlignment(nn.Module):
    """CReST+'s alignment as a gate alignment: probs (N, K) -> normalise(probs · (π^t/Σπ^t + 1e-6) / (p̄ + 1e-6))
    (`losses.crest.progressive_alignment`). π (`p_target`, K): the labeled class distribution; p̄ (`p_model`, K): EMA
    (momentum) of the mean prediction gathered over ranks, set to the first batch's mean (all zeros until then); t
    (`temperature`): set by the method for the current generation."""

    def __init__(self, num_classes: int, momentum: float = 0.999) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("p_target", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("p_model", torch.zeros(num_classes))
        self.register_buffer("temperature", torch.tensor(1.0))

    @torch.no_grad()
    def observe_labeled(self, probs: Tensor) -> None:
        """The target is the labeled class distribution (fixed); the labeled predictions are not used."""

    @torch.no_grad()
    def forward(self, probs: Tensor) -> Tensor:
        mean = dist.gather_no_grad(probs.float()).mean(dim=0)
        if float(self.p_model.sum()) == 0.0:  # USB: p_model starts as the first batch's mean
            self.p_model.copy_(mean)
        else:
            self.p_model.mul_(self.momentum).add_((1 - self.momentum) * mean)
        return progressive_alignment(probs.float(), self.p_model, self.p_target, float(self.temperature))


@register("crest", CReSTConfig)
class CReST(WeakStrongMethod):
    """CReST / CReST+: FixMatch in generations; at each generation boundary the most confident pseudo-labeled
    unlabeled images are chosen per class, rare classes at higher rates, and trained on as labeled images for the next
    generation; CReST+ also aligns the pseudo-labels to the labeled distribution at a decreasing temperature.

    Tensors: labeled logits (B, K), weak / strong unlabeled logits (N, K) with N = mu·B; the bank `bank_confidence`
    (N_u,) float and `bank_prediction` (N_u,) int64 (−1: no prediction yet); the choice `chosen_label` (N_u,) int64
    (−1: not chosen); `generation` () int64; `labeled_counts` (K,) and `rates` (K,)."""

    @classmethod
    def context_from(cls, cfg, data, load_record) -> dict:
        return {**super().context_from(cfg, data, load_record), "labeled_labels": data.train.labels[data.labeled]}

    def __init__(self, cfg, backbone: nn.Module, info, num_unlabeled: int = 0,
                 labeled_labels: Optional[Tensor] = None) -> None:
        super().__init__(cfg, backbone, info, num_unlabeled)
        k = info.num_classes
        counts = whole_set_counts(labeled_labels, k, num_unlabeled, self.name, "the most frequent class's sampling "
                                  "rate (N_K/N_1)^(1/alpha) and the alignment target (the labeled distribution) "
                                  "would be 0")
        self.register_buffer("labeled_counts", counts.float())
        self.register_buffer("rates", crest_sampling_rates(counts, cfg.alpha).float())
        self.register_buffer("bank_confidence", torch.zeros(num_unlabeled))
        self.register_buffer("bank_prediction", torch.full((num_unlabeled,), -1, dtype=torch.long))
        self.register_buffer("chosen_label", torch.full((num_unlabeled,), -1, dtype=torch.long))
        self.register_buffer("generation", torch.tensor(0, dtype=torch.long))
        if cfg.progressive_alignment:
            self.gate.alignment.p_target.copy_(counts / counts.sum())
        self._warned_run, self._warned_unseen = False, False
        for name in ("_chosen_seen", "_chosen_correct"):  # diagnostics: chosen rows with a known hidden label
            self.register_buffer(name, torch.zeros(()), persistent=False)

    def build_gate(self, cfg, num_classes: int, num_unlabeled: int) -> PseudoLabelGate:
        alignment = ProgressiveAlignment(num_classes, cfg.ema_p) if cfg.progressive_alignment else None
        return PseudoLabelGate.from_config(cfg, num_classes, num_unlabeled, alignment=alignment)

    def num_chosen(self) -> int:
        return int((self.chosen_label >= 0).sum())

    def chosen_fraction(self) -> float:
        """f = N_chosen / (N_labeled + N_chosen): the chosen images' share of the enlarged labeled set."""
        chosen = self.num_chosen()
        return chosen / (float(self.labeled_counts.sum()) + chosen)

    def threshold_metrics(self) -> dict:
        chosen = self.chosen_label[self.chosen_label >= 0]
        per_class = torch.bincount(chosen, minlength=self.info.num_classes)[:self.info.num_classes]
        out = {**super().threshold_metrics(), "crest/generation": int(self.generation),
               "crest/chosen_per_class": [int(c) for c in per_class]}
        if self.cfg.progressive_alignment:
            out["crest/temperature"] = round(float(self.gate.alignment.temperature), 4)
            out["crest/p_model"] = [round(float(p), 4) for p in self.gate.alignment.p_model]
        return out

    def epoch_metrics(self) -> dict[str, float]:
        """The semi-supervised epoch metrics plus crest/chosen_accuracy: how often a chosen row's frozen pseudo-label
        was its hidden label, over the epoch's chosen rows (diagnostic only)."""
        out = super().epoch_metrics()
        if float(self._chosen_seen) > 0:
            out["crest/chosen_accuracy"] = float(self._chosen_correct / self._chosen_seen)
        self._chosen_seen.zero_()
        self._chosen_correct.zero_()
        return out

    @torch.no_grad()
    def start_generation(self, progress: Progress) -> None:
        """Move to the generation `progress.step` falls in: at a boundary, choose from the bank (the predictions up to
        the previous step) the images trained as labeled in the new generation; set CReST+'s temperature. Micro-batches
        of one step and repeated calls change nothing more."""
        self._warn_if_short(progress)
        now = generation_of(progress.step, progress.total_steps, self.cfg.num_gens)
        if now > int(self.generation):
            seen = self.bank_prediction >= 0
            self._warn_if_unseen(seen, progress)
            chosen = crest_select(self.bank_confidence, self.bank_prediction.clamp_min(0), self.rates.to(
                self.bank_confidence.device), valid=seen)
            self.chosen_label.copy_(torch.where(chosen, self.bank_prediction, torch.full_like(self.bank_prediction,
                                                                                              -1)))
            self.generation.fill_(now)
        if self.cfg.progressive_alignment:
            self.gate.alignment.temperature.fill_(progressive_temperature(int(self.generation), self.cfg.num_gens,
                                                                          self.cfg.alignment_t_min))

    @torch.no_grad()
    def remember(self, probs: Tensor, index: Tensor) -> None:
        """Write the raw weak-view predictions probs (N, K) of the unlabeled images at positions index (N,), every
        rank's, into the bank (confidence and class)."""
        index, probs = dist.gather_no_grad(index.long()), dist.gather_no_grad(probs.float())
        confidence, prediction = probs.max(dim=1)
        self.bank_confidence[index] = confidence.to(self.bank_confidence.dtype)
        self.bank_prediction[index] = prediction

    def _warn_if_short(self, progress: Progress) -> None:
        if self._warned_run:
            return
        self._warned_run = True
        if self.cfg.num_gens == 1:
            warnings.warn("crest: num_gens 1 has no generation boundary, so no pseudo-labeled image is ever added to "
                          "the labeled set (this trains as FixMatch, with alignment at temperature 1 for CReST+); "
                          "USB: crest_num_gens 6")
        elif progress.total_steps < self.cfg.num_gens:
            warnings.warn(f"crest: the run has {progress.total_steps} steps for num_gens {self.cfg.num_gens}: some "
                          f"generations have no step; lower num_gens")

    def _warn_if_unseen(self, seen: Tensor, progress: Progress) -> None:
        missing = int((~seen).sum())
        if missing and not self._warned_unseen:
            self._warned_unseen = True
            length = max(1, progress.total_steps) / self.cfg.num_gens
            warnings.warn(f"crest: at the generation boundary of step {progress.step}, {missing} of "
                          f"{seen.numel()} unlabeled images have not been seen yet (a generation is about "
                          f"{length:.0f} steps), so they cannot be chosen; lengthen the run or lower num_gens")

    @staticmethod
    def chosen_loss(logits_w: Tensor, targets: Tensor, rows: Tensor) -> Optional[Tensor]:
        """Mean cross-entropy of the chosen rows of the global unlabeled batch (None when no rank has one): each
        rank's sum is scaled by world / (chosen rows over all ranks), so DDP's gradient average is the global
        mean, as one process on the whole batch. logits_w (N, K), targets (N,) (−1: not chosen), rows (N,) bool."""
        total = float(dist.all_reduce_sum(rows.sum().float()))
        if total == 0:
            return None
        per_row = F.cross_entropy(logits_w.float(), targets.clamp_min(0), reduction="none")
        return (per_row * rows).sum() * dist.world_size() / total

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        if batch.u_index is None:
            raise ValueError("crest needs the unlabeled images' positions (batch.u_index) for its bank")
        self.start_generation(progress)
        logits_x, logits_w, logits_s = self.forward_views(*self.views(batch))
        labeled = F.cross_entropy(logits_x.float(), batch.y)
        with torch.no_grad():
            self.remember(torch.softmax(logits_w.detach().float(), dim=1), batch.u_index)
            targets = self.chosen_label[batch.u_index.to(self.chosen_label.device)]
            rows = targets >= 0
            if batch.u_y is not None:
                known = rows & (batch.u_y >= 0)
                self._chosen_seen += known.sum()
                self._chosen_correct += (known & (targets == batch.u_y)).sum()
        chosen = self.chosen_loss(logits_w, targets, rows)
        if chosen is not None:
            share = self.chosen_fraction()
            supervised = (1 - share) * labeled + share * chosen
        else:
            chosen = torch.zeros((), device=labeled.device)
            supervised = labeled
        probs, weights = self.gated_pseudo_labels(logits_x, logits_w, batch)
        unsupervised = consistency_loss(logits_s, probs.argmax(dim=1), weights)
        out = {"supervised_loss": labeled.detach(), "chosen_loss": chosen.detach(),
               "chosen_rows": rows.float().mean(), "unsupervised_loss": unsupervised.detach(),
               "mask_rate": (weights > 0.5).float().mean(),
               "crest_generation": torch.tensor(float(self.generation), device=labeled.device)}
        return self.finish(supervised + cfg.lambda_u * unsupervised, out, logits_s, weights)
