"""SimMatch (Zheng et al. 2022, "SimMatch: semi-supervised learning with similarity matching"), as USB implements
it: FixMatch's classifier consistency with soft pseudo-labels, plus an instance consistency over a memory bank of
labeled embeddings (a projection head's L2-normalised output).

Each step: the weak view's class prediction (distribution-aligned over the last `da_len` batches) and its
similarity to the bank are propagated into each other (unfolding: class -> instance pseudo-label q̂; aggregation:
instance -> class pseudo-label p̂, `simmatch_unfold_aggregate`); the strong view is trained towards p̂ where the
threshold policy is confident (λ_u) and its bank similarities towards q̂ (`simmatch_in_loss`, λ_in); then the bank
slots of the labeled batch (one slot per labeled image) move towards the labeled weak view's embeddings, as USB's
SimMatch with its EMA teacher: slot ← normalise(ema_bank · slot + (1 − ema_bank) · embedding), the embeddings those
of a teacher (backbone + projector averaged with momentum train.ema_decay after every step, run in eval mode;
`bank_teacher`). `ema_bank: 0, bank_teacher: false` overwrites the slots with the student's embeddings of the joint
pass (this module's behaviour before the teacher)."""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..common import distributed as dist
from ..data.loader import Batch
from ..losses import consistency_loss, simmatch_in_loss, simmatch_unfold_aggregate
from ..models.heads import linear_relu_linear
from .base import Progress
from .momentum import frozen_copy, update_momentum_pairs
from .pseudo_gate import PseudoLabelGate
from .registry import register
from .semi import USB_SGD
from .weak_strong import GatedConfig, LabeledBankMethod


class SimMatchConfig(GatedConfig):
    method: Literal["simmatch"]

    recommended = USB_SGD
    recommended_source = ("SimMatch (Zheng et al. 2022) / USB config: SGD Nesterov momentum 0.9, lr 0.03 (no batch scaling), weight decay 5e-4, lr · cos(7πk/16K)")
    threshold: float = Field(0.95, ge=0, le=1, description="confidence cut-off of the class pseudo-label (USB "
                                                           "p_cutoff)")
    temperature: float = Field(0.1, gt=0, description="temperature of the bank similarities (USB T)")
    lambda_in: float = Field(1.0, ge=0, description="weight of the instance consistency loss (USB in_loss_ratio)")
    proj_size: int = Field(128, ge=1, description="embedding size of the projection head (USB proj_size)")
    smoothing_alpha: float = Field(0.9, ge=0, le=1, description="p̂ = α · class prediction + (1 − α) · aggregated "
                                                                "similarity (USB smoothing_alpha)")
    da_len: int = Field(32, ge=0, description="distribution alignment to uniform over the mean prediction of the "
                                              "last da_len batches (USB da_len); 0 = off")
    ema_bank: float = Field(0.7, ge=0, le=1, description="bank momentum: slot ← normalise(ema_bank · slot + "
                                                         "(1 − ema_bank) · labeled embedding) (USB ema_bank); "
                                                         "0: overwrite")
    bank_teacher: bool = Field(True, description="the bank's labeled embeddings come from an EMA teacher (backbone "
                                                 "+ projector, momentum train.ema_decay, none: the current weights; "
                                                 "eval mode), as USB; false: the student's embeddings of the joint "
                                                 "training pass")


class AlignmentQueue(nn.Module):
    """USB's `DistAlignQueueHook` with a uniform target: p ← normalise(p · (1/K + ε) / (p̄_model + ε)), p̄_model the
    mean of the unlabeled batches' mean predictions over the last `length` steps (the queue starts uniform)."""

    def __init__(self, num_classes: int, length: int) -> None:
        super().__init__()
        self.register_buffer("queue", torch.full((length, num_classes), 1.0 / num_classes))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def forward(self, probs: Tensor) -> Tensor:
        """probs (N, K) -> aligned (N, K), rows summing to 1; pushes this batch's mean into the queue first."""
        self.queue[self.pointer] = dist.gather_no_grad(probs.float()).mean(dim=0)
        self.pointer.copy_((self.pointer + 1) % self.queue.shape[0])
        uniform = 1.0 / probs.shape[1]
        aligned = probs * (uniform + 1e-6) / (self.queue.mean(dim=0) + 1e-6)
        return aligned / aligned.sum(dim=1, keepdim=True)

    def observe_labeled(self, probs: Tensor) -> None:
        """The target is uniform: labeled predictions are not needed."""


@register("simmatch", SimMatchConfig)
class SimMatch(LabeledBankMethod):
    """SimMatch: soft pseudo-labels from class and labeled-bank similarities propagated into each other, plus
    instance consistency of the strong view over the bank."""

    def __init__(self, cfg, backbone: nn.Module, info, num_unlabeled: int = 0,
                 labeled_index: Optional[Tensor] = None, labeled_labels: Optional[Tensor] = None) -> None:
        super().__init__(cfg, backbone, info, num_unlabeled)
        if labeled_index is None or labeled_labels is None:
            raise ValueError("SimMatch needs the labeled set (labeled_index, labeled_labels) for its memory bank")
        features = backbone.num_features
        self.projector = linear_relu_linear(features, cfg.proj_size)  # USB's SimMatch_Net.mlp_proj
        if cfg.bank_teacher:
            self.teacher_backbone = frozen_copy(backbone).eval()
            self.teacher_projector = frozen_copy(self.projector).eval()
        slots = len(labeled_index)
        self.register_buffer("bank", F.normalize(torch.randn(slots, cfg.proj_size), dim=1))  # (M, D)
        self.register_buffer("bank_labels", labeled_labels.long().clone())  # (M,)
        slot_of = torch.full((int(labeled_index.max()) + 1,), -1, dtype=torch.long)
        slot_of[labeled_index.long()] = torch.arange(slots)
        self.register_buffer("slot_of", slot_of, persistent=False)  # training-set index -> bank slot

    def build_gate(self, cfg, num_classes: int, num_unlabeled: int) -> PseudoLabelGate:
        alignment = AlignmentQueue(num_classes, cfg.da_len) if cfg.da_len > 0 else None
        return PseudoLabelGate.from_config(cfg, num_classes, num_unlabeled, alignment)

    def train(self, mode: bool = True) -> "SimMatch":
        super().train(mode)
        if self.cfg.bank_teacher:  # the teacher always runs in eval mode (BN running statistics)
            self.teacher_backbone.eval()
            self.teacher_projector.eval()
        return self

    def after_optimizer_step(self, progress: Progress) -> None:
        """The teacher follows the student: teacher ← m · teacher + (1 − m) · student, m = train.ema_decay
        (constant, like the evaluated EMA; none: m = 0), BN statistics copied."""
        super().after_optimizer_step(progress)
        if self.cfg.bank_teacher:
            pairs = [(self.net.backbone, self.teacher_backbone), (self.projector, self.teacher_projector)]
            update_momentum_pairs(pairs, self.cfg.train.ema_decay or 0.0)

    def embed(self, features: Tensor, projector: Optional[nn.Module] = None) -> Tensor:
        """backbone features (N, F) -> L2-normalised embeddings (N, proj_size) (projector: the student's default)."""
        projector = self.projector if projector is None else projector
        return F.normalize(projector(features).float(), dim=1)

    @torch.no_grad()
    def bank_embeddings(self, x_weak: Tensor, student: Tensor) -> Tensor:
        """The labeled embeddings (N, D) the bank moves towards: the teacher's of the weak view x_weak (N, C, H, W)
        with bank_teacher, else `student` (N, D), the student's from the joint pass."""
        if not self.cfg.bank_teacher:
            return student.detach()
        return self.embed(self.teacher_backbone(x_weak), self.teacher_projector)

    @torch.no_grad()
    def update_bank(self, embeddings: Tensor, labels: Tensor, index: Tensor) -> None:
        """Move the slots of the labeled batch's training-set indices (N,) towards its embeddings (N, D):
        slot ← normalise(ema_bank · slot + (1 − ema_bank) · embedding) (ema_bank 0: the embedding), and set their
        labels (N,) (all gathered over ranks)."""
        embeddings, labels = dist.gather_no_grad(embeddings.float()), dist.gather_no_grad(labels)
        index = dist.gather_no_grad(index)
        known = (index >= 0) & (index < self.slot_of.shape[0])  # streamed batches mark unreadable images with −1
        slots = torch.full_like(index, -1)
        slots[known] = self.slot_of[index[known]]
        keep = slots >= 0
        rows, momentum = slots[keep], self.cfg.ema_bank
        self.bank[rows] = F.normalize(momentum * self.bank[rows] + (1 - momentum) * embeddings[keep], dim=1)
        self.bank_labels[slots[keep]] = labels[keep]

    def features_and_embeddings(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (N, C, H, W) -> (logits (N, K), L2-normalised embeddings (N, proj_size)) of one backbone pass."""
        features = self.net.backbone(images)
        return self.net.head(features), self.embed(features)

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        if batch.x_index is None:
            raise ValueError("SimMatch needs batch.x_index (the labeled images' indices) to fill its memory bank")
        x, u_weak, u_strong = self.views(batch)
        (logits_x, embeddings_x), (logits_w, embeddings_w), (logits_s, embeddings_s) = (
            self.forward_views(x, u_weak, u_strong, self.features_and_embeddings))
        supervised = F.cross_entropy(logits_x.float(), batch.y)
        bank = self.bank.clone()
        with torch.no_grad():  # the gate weighs the class pseudo-labels p̂ after unfolding/aggregation
            self.gate.observe_labeled(torch.softmax(logits_x.detach().float(), dim=1))
            probs = self.gate.align(torch.softmax(logits_w.detach().float(), dim=1))
            instance_targets, class_targets = simmatch_unfold_aggregate(
                embeddings_w, bank, self.bank_labels, probs, cfg.temperature, cfg.smoothing_alpha)
            weights = self.gate.weigh(class_targets, batch.u_index)
            self.track_pseudo_labels(class_targets, weights, batch.u_y)
        unsupervised = consistency_loss(logits_s, class_targets, weights)
        instance = simmatch_in_loss(embeddings_s, bank, instance_targets, cfg.temperature)
        loss = supervised + cfg.lambda_u * unsupervised + cfg.lambda_in * instance
        self.update_bank(self.bank_embeddings(x, embeddings_x), batch.y, batch.x_index)
        out = {"supervised_loss": supervised.detach(), "unsupervised_loss": unsupervised.detach(),
               "instance_loss": instance.detach(), "mask_rate": (weights > 0.5).float().mean()}
        return self.finish(loss, out, logits_s, weights)
