"""SimMatchV2 (Zheng et al., ICCV 2023, "SimMatchV2: semi-supervised learning with graph consistency"), as its
reference code trains it (github.com/mingkai-zheng/SimMatchV2: models/simmatchv2.py, main.py, script/train.sh).

Each step an EMA teacher (backbone + classifier head + projection head, momentum `ema_m`) looks at the labeled and
the weak unlabeled images: its unlabeled class probabilities p (N, K) are distribution-aligned (p / p̄, p̄ a running
mean of the batch means with momentum `da_momentum`), and its L2-normalised embeddings z_w (N, D) define

- the propagated pseudo-label p̂ (N, K): label propagation over each weak node and its `topn` nearest labeled-bank
  nodes (edge-node consistency, `simmatchv2_label_propagation`);
- the edges to the unlabeled bank softmax(z_w · U_bankᵀ / T) (N, M_u).

The student sees the labeled and the strong images (not the weak ones) and is trained by
supervised CE + λ_u · CE(strong logits, p̂) on the samples whose max p ≥ `threshold` (node-node)
+ λ_ee · CE(strong edges, teacher edges) (edge-edge, `simmatchv2_edge_edge_loss`)
+ λ_ne · CE(strong edges @ bank probabilities, p) (node-edge, `simmatchv2_node_edge_loss`).
Then the labeled bank's slots of the labeled batch take the teacher's labeled embeddings (overwritten, one slot per
labeled image, labels fixed one-hot), and the unlabeled bank (a ring buffer of `bank_batches` global unlabeled
batches) takes the teacher's weak embeddings and aligned probabilities, both gathered over ranks. Banks, teacher and
alignment are buffers / submodules: a resumed run continues exactly."""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..common import distributed as dist
from ..data.loader import Batch
from ..losses.pseudo_label import consistency_loss
from ..losses.simmatchv2 import (simmatchv2_edge_edge_loss, simmatchv2_label_propagation,
                                 simmatchv2_node_edge_loss)
from ..models.heads import linear_relu_linear
from .base import Progress
from .momentum import cosine_ramp, frozen_copy
from .pseudo_gate import PseudoLabelGate
from .registry import register
from .weak_strong import GatedConfig, LabeledBankMethod

_REF = "github.com/mingkai-zheng/SimMatchV2"
_ARGS = "main.py argparse default"
_TRAIN_SH = "script/train.sh, ImageNet 10% setting"


class SimMatchV2Config(GatedConfig):
    method: Literal["simmatchv2"]

    recommended = {"optimizer": {"name": "sgd", "lr": 0.03, "lr_scaling": "none", "weight_decay": 1e-4,
                                 "momentum": 0.9, "nesterov": True},
                   "schedule": {"name": "cosine", "warmup_epochs": 5}}
    recommended_source = ("SimMatchV2 (Zheng et al. 2023) reference " + _REF + " (script/train.sh + main.py "
                          "defaults, ImageNet): SGD Nesterov momentum 0.9, lr 0.03 with -b 8 labeled + mu 5 × 8 "
                          "unlabeled images per GPU (no batch scaling), weight decay 1e-4, cosine schedule, 5 warm-up "
                          "epochs")
    threshold: float = Field(0.7, ge=0, le=1, description="confidence cut-off of the teacher's aligned prediction "
                                                          "that gates the node-node loss (reference --threshold 0.7, "
                                                          + _ARGS + ")")
    lambda_u: float = Field(10.0, ge=0, description="weight of the node-node loss (reference --lambda_nn 10, "
                                                    + _TRAIN_SH + " and 1%)")
    lambda_ee: float = Field(5.0, ge=0, description="weight of the edge-edge loss (reference --lambda_ee 5, "
                                                    + _TRAIN_SH + "; 10 in the 1% setting)")
    lambda_ne: float = Field(5.0, ge=0, description="weight of the node-edge loss (reference --lambda_ne 5, "
                                                    + _TRAIN_SH + "; 10 in the 1% setting)")
    joint_forward: bool = Field(True, description="the student's labeled + strong images in one forward pass (the "
                                                  "teacher's labeled + weak images in another), as the reference")
    mu: int = Field(5, ge=1, description="unlabeled batch = mu × labeled batch (reference --mu 5, " + _ARGS + ")")
    temperature: float = Field(0.1, gt=0, description="temperature of every edge (bank similarities and the "
                                                      "propagation graph; reference --t 0.1, " + _TRAIN_SH + ")")
    alpha: float = Field(0.1, ge=0, lt=1, description="label propagation F = (1 − α)(I − α·A)⁻¹·Y (reference "
                                                      "--alpha 0.1, " + _TRAIN_SH + "); 0: the teacher's "
                                                      "prediction unchanged")
    topn: int = Field(128, ge=1, description="labeled-bank neighbours of each weak node in the propagation graph "
                                             "(reference --topn 128, " + _TRAIN_SH + "); at most the labeled set")
    bank_batches: int = Field(256, ge=1, description="unlabeled bank rows = bank_batches · mu · train.batch_size "
                                                     "(reference --k 256: K = k · global unlabeled batch)")
    proj_size: int = Field(128, ge=1, description="embedding size of the projection head (reference dim 128)")
    distribution_alignment: bool = Field(True, description="align the teacher's prediction p ← normalise(p / p̄) "
                                                           "(reference --DA, on in " + _TRAIN_SH + ")")
    da_momentum: float = Field(0.9, ge=0, lt=1, description="p̄ ← m · p̄ + (1 − m) · batch mean, after aligning "
                                                            "(reference --da_m 0.9, " + _TRAIN_SH + ")")
    ema_m: float = Field(0.999, ge=0, le=1, description="teacher momentum; constant when > 0.996, else it rises "
                                                        "to 1 along a half cosine (reference --ema-m 0.999 and its "
                                                        "rule, " + _ARGS + ")")
    eman: bool = Field(False, description="EMAN teacher: eval mode, BN statistics averaged with the weights "
                                          "(reference --eman, off in " + _TRAIN_SH + "); false: the teacher "
                                          "normalises with its batch's statistics, weights averaged")


class MomentumAlignment(nn.Module):
    """The reference's distribution alignment: p ← normalise(p / p̄), then p̄ ← m · p̄ + (1 − m) · mean of the batch
    (gathered over ranks), p̄ starting uniform."""

    def __init__(self, num_classes: int, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("p_model", torch.full((num_classes,), 1.0 / num_classes))

    @torch.no_grad()
    def forward(self, probs: Tensor) -> Tensor:
        """probs (N, K) -> aligned (N, K), rows summing to 1, with the running mean before this batch."""
        aligned = probs / self.p_model
        aligned = aligned / aligned.sum(dim=1, keepdim=True)
        mean = dist.gather_no_grad(probs.float()).mean(dim=0)
        self.p_model.mul_(self.momentum).add_((1.0 - self.momentum) * mean)
        return aligned

    def observe_labeled(self, probs: Tensor) -> None:
        """The target is uniform: labeled predictions are not needed."""


@register("simmatchv2", SimMatchV2Config)
class SimMatchV2(LabeledBankMethod):
    """SimMatchV2: an EMA teacher's weak-view nodes give pseudo-labels propagated over their labeled-bank
    neighbours (node-node), and the strong view's edges to an unlabeled bank are trained towards the teacher's
    edges (edge-edge) and, aggregated over the bank's predictions, towards its class prediction (node-edge)."""

    def __init__(self, cfg, backbone: nn.Module, info, num_unlabeled: int = 0,
                 labeled_index: Optional[Tensor] = None, labeled_labels: Optional[Tensor] = None) -> None:
        super().__init__(cfg, backbone, info, num_unlabeled)
        if labeled_index is None or labeled_labels is None or len(labeled_index) == 0:
            raise ValueError("SimMatchV2 needs the labeled set (labeled_index, labeled_labels) for its labeled bank")
        features = backbone.num_features
        self.projector = linear_relu_linear(features, cfg.proj_size)  # the reference's ResNet.head
        self.teacher_backbone = frozen_copy(backbone)
        self.teacher_head = frozen_copy(self.net.head)
        self.teacher_projector = frozen_copy(self.projector)
        # the student's head may be re-initialised after construction (train.head_init): the first step copies it
        self.register_buffer("teacher_synced", torch.zeros((), dtype=torch.bool))
        slots = len(labeled_index)
        self.register_buffer("labeled_bank", F.normalize(torch.randn(slots, cfg.proj_size), dim=1))  # (M_l, D)
        self.register_buffer("labeled_bank_labels", labeled_labels.long().clone())  # (M_l,)
        slot_of = torch.full((int(labeled_index.max()) + 1,), -1, dtype=torch.long)
        slot_of[labeled_index.long()] = torch.arange(slots)
        self.register_buffer("slot_of", slot_of, persistent=False)  # training-set index -> labeled slot
        rows = cfg.bank_batches * cfg.mu * cfg.train.batch_size
        self.register_buffer("unlabeled_bank", F.normalize(torch.randn(rows, cfg.proj_size), dim=1))  # (M_u, D)
        self.register_buffer("unlabeled_bank_probs", torch.zeros(rows, info.num_classes))  # (M_u, K)
        self.register_buffer("unlabeled_pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("unlabeled_written", torch.zeros((), dtype=torch.bool))
        self.train(True)

    def build_gate(self, cfg, num_classes: int, num_unlabeled: int) -> PseudoLabelGate:
        alignment = MomentumAlignment(num_classes, cfg.da_momentum) if cfg.distribution_alignment else None
        return PseudoLabelGate.from_config(cfg, num_classes, num_unlabeled, alignment)

    def teacher_modules(self) -> list[tuple[nn.Module, nn.Module]]:
        """(student, teacher) pairs: backbone, classifier head, projection head."""
        return [(self.net.backbone, self.teacher_backbone), (self.net.head, self.teacher_head),
                (self.projector, self.teacher_projector)]

    def train(self, mode: bool = True) -> "SimMatchV2":
        super().train(mode)
        if self.cfg.eman:  # the EMAN teacher always runs in eval mode
            for _, teacher in self.teacher_modules():
                teacher.eval()
        return self

    def teacher_momentum(self, progress: Progress) -> float:
        """The reference's rule: ema_m when > 0.996, else 1 − (1 − ema_m)(cos(π k / K) + 1) / 2 at step k of K."""
        m = self.cfg.ema_m
        return m if m > 0.996 else cosine_ramp(m, 1.0, progress.step + 1, progress.total_steps)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher ← m · teacher + (1 − m) · student: parameters; with eman also the floating-point buffers (BN
        statistics), integer buffers copied. Without eman the teacher keeps its own buffers (reference)."""
        for student, teacher in self.teacher_modules():
            torch._foreach_lerp_(list(teacher.parameters()), [p.detach() for p in student.parameters()],
                                 1.0 - momentum)
            if self.cfg.eman:
                for t_buffer, buffer in zip(teacher.buffers(), student.buffers()):
                    if t_buffer.is_floating_point():
                        t_buffer.lerp_(buffer, 1.0 - momentum)
                    else:
                        t_buffer.copy_(buffer)

    def after_optimizer_step(self, progress: Progress) -> None:
        super().after_optimizer_step(progress)
        self.update_teacher(self.teacher_momentum(progress))

    def embed(self, features: Tensor, projector: Optional[nn.Module] = None) -> Tensor:
        """backbone features (N, F) -> L2-normalised embeddings (N, proj_size) (projector: the student's default)."""
        projector = self.projector if projector is None else projector
        return F.normalize(projector(features).float(), dim=1)

    def student_outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (N, C, H, W) -> (logits (N, K), embeddings (N, proj_size)) of the student, one backbone pass."""
        features = self.net.backbone(images)
        return self.net.head(features), self.embed(features)

    @torch.no_grad()
    def teacher_outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (N, C, H, W) -> (logits (N, K), embeddings (N, proj_size)) of the teacher, no gradient."""
        if not bool(self.teacher_synced):
            self.update_teacher(0.0)
            self.teacher_synced.fill_(True)
        features = self.teacher_backbone(images)
        return self.teacher_head(features).float(), self.embed(features, self.teacher_projector)

    @torch.no_grad()
    def update_labeled_bank(self, embeddings: Tensor, index: Tensor) -> None:
        """Overwrite the labeled slots of training-set indices index (N,) with embeddings (N, D), both gathered over
        ranks (streamed batches mark unreadable images with index −1: skipped)."""
        embeddings, index = dist.gather_no_grad(embeddings.float()), dist.gather_no_grad(index)
        known = (index >= 0) & (index < self.slot_of.shape[0])
        slots = torch.full_like(index, -1)
        slots[known] = self.slot_of[index[known]]
        keep = slots >= 0
        self.labeled_bank[slots[keep]] = embeddings[keep]

    @torch.no_grad()
    def update_unlabeled_bank(self, embeddings: Tensor, probs: Tensor) -> None:
        """Write embeddings (N, D) and probs (N, K), gathered over ranks, at the ring buffer's pointer, wrapping to
        the start (the reference's sizes are multiples of the batch; ours wrap when they are not)."""
        embeddings, probs = dist.gather_no_grad(embeddings.float()), dist.gather_no_grad(probs.float())
        size, n = self.unlabeled_bank.shape[0], embeddings.shape[0]
        if n > size:  # only the newest rows fit
            embeddings, probs, n = embeddings[-size:], probs[-size:], size
        rows = (self.unlabeled_pointer + torch.arange(n, device=embeddings.device)) % size
        self.unlabeled_bank[rows] = embeddings
        self.unlabeled_bank_probs[rows] = probs
        self.unlabeled_pointer.copy_((self.unlabeled_pointer + n) % size)
        self.unlabeled_written.fill_(True)

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        if batch.x_index is None:
            raise ValueError("SimMatchV2 needs batch.x_index (the labeled images' indices) to fill its labeled bank")
        x, u_weak, u_strong = self.views(batch)
        b = x.shape[0]
        labeled_bank, labeled_labels = self.labeled_bank.clone(), self.labeled_bank_labels.clone()
        unlabeled_bank, unlabeled_probs = self.unlabeled_bank.clone(), self.unlabeled_bank_probs.clone()
        bank_written = bool(self.unlabeled_written)
        with torch.no_grad():
            logits_t, embeddings_t = self.teacher_outputs(torch.cat([x, u_weak]))
            embeddings_tx, embeddings_tu = embeddings_t[:b], embeddings_t[b:]
            self.gate.observe_labeled(torch.softmax(logits_t[:b], dim=1))
            probs = self.gate.align(torch.softmax(logits_t[b:], dim=1))  # (N, K), the teacher's aligned p
            weights = self.gate.weigh(probs, batch.u_index)
            pseudo = simmatchv2_label_propagation(embeddings_tu, probs, labeled_bank, labeled_labels, cfg.topn,
                                                  cfg.temperature, cfg.alpha)
            self.track_pseudo_labels(pseudo, weights, batch.u_y)
        if cfg.joint_forward:
            logits, embeddings = self.student_outputs(torch.cat([x, u_strong]))
            logits_x, logits_s, embeddings_s = logits[:b], logits[b:], embeddings[b:]
        else:
            logits_x, _ = self.student_outputs(x)
            logits_s, embeddings_s = self.student_outputs(u_strong)
        supervised = F.cross_entropy(logits_x.float(), batch.y)
        node_node = consistency_loss(logits_s, pseudo, weights)
        edge_edge = simmatchv2_edge_edge_loss(embeddings_s, embeddings_tu, unlabeled_bank, cfg.temperature)
        if bank_written:
            node_edge = simmatchv2_node_edge_loss(embeddings_s, unlabeled_bank, unlabeled_probs, probs,
                                                  cfg.temperature)
        else:  # an unwritten bank has no class mass: the reference's guard drops the term
            node_edge = embeddings_s.new_zeros(())
        loss = supervised + cfg.lambda_u * node_node + cfg.lambda_ee * edge_edge + cfg.lambda_ne * node_edge
        self.update_labeled_bank(embeddings_tx, batch.x_index)
        self.update_unlabeled_bank(embeddings_tu, probs)
        out = {"supervised_loss": supervised.detach(), "unsupervised_loss": node_node.detach(),
               "edge_edge_loss": edge_edge.detach(), "node_edge_loss": node_edge.detach(),
               "mask_rate": (weights > 0.5).float().mean()}
        return self.finish(loss, out, logits_s, weights)
