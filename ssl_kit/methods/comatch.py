"""CoMatch (Li, Xiong & Hoi, ICCV 2021, "CoMatch: semi-supervised learning with contrastive graph
regularization"), as USB runs it (`comatch`): FixMatch's thresholded consistency on a strong view, with

- a projection head (USB's CoMatch_Net.mlp_proj: Linear-ReLU-Linear to proj_size, L2-normalised);
- pseudo-labels distribution-aligned to uniform over the last `da_len` batches, then memory-smoothed once the bank is
  full: p̂ = α · p + (1 − α) · softmax(z_w · Z_bankᵀ / T) @ P_bank (`comatch_memory_smoothing`);
- a pseudo-label graph W^q of the unlabeled batch (p̂ p̂ᵀ, self-loops 1, thresholded at contrast_p_cutoff,
  row-normalised; `comatch_pseudo_label_graph`) as the target of the embedding graph of two strong views
  (`comatch_contrastive_loss`, weight contrast_loss_ratio);
- a memory bank (ring buffer of queue_batch · (mu + 1) · train.batch_size rows) of the weak embeddings and
  probabilities of the unlabeled (aligned, before smoothing) and labeled (one-hot labels) images, filled with the
  global (gathered) batch after each step's pseudo-labels are made."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..common import distributed as dist
from ..data.loader import Batch
from ..losses import (comatch_contrastive_loss, comatch_memory_smoothing, comatch_pseudo_label_graph,
                      consistency_loss)
from ..models.heads import linear_relu_linear
from .base import Progress
from .pseudo_gate import PseudoLabelGate
from .registry import register
from .semi import USB_SGD
from .simmatch import AlignmentQueue
from .weak_strong import GatedConfig, WeakStrongMethod

_USB = "USB semilearn/algorithms/comatch/comatch.py, config/classic_cv/comatch/comatch_cifar10_40_0.yaml"


class CoMatchConfig(GatedConfig):
    method: Literal["comatch"]

    recommended = USB_SGD
    recommended_source = ("CoMatch (Li, Xiong & Hoi 2021) / USB classic-cv config (" + _USB + "): SGD Nesterov "
                          "momentum 0.9, lr 0.03 (no batch scaling), weight decay 5e-4, lr · cos(7πk/16K), uratio 7, "
                          "ulb_loss_ratio 1.0")
    threshold: float = Field(0.95, ge=0, le=1, description="confidence cut-off of the smoothed soft pseudo-label "
                                                           "(USB p_cutoff 0.95, hard_label false)")
    contrast_p_cutoff: float = Field(0.8, ge=0, le=1, description="pseudo-label graph edges below this similarity "
                                                                  "are dropped (USB contrast_p_cutoff 0.8)")
    contrast_loss_ratio: float = Field(1.0, ge=0, description="weight of the graph-contrastive loss (USB "
                                                              "contrast_loss_ratio 1.0)")
    temperature: float = Field(0.2, gt=0, description="temperature of the memory smoothing and of the embedding "
                                                      "graph (USB T 0.2 in the cifar10 config, the paper's value; "
                                                      "USB's argparse default 0.5)")
    proj_size: int = Field(64, ge=1, description="embedding size of the projection head (USB proj_size 64, "
                                                 "cifar10 config)")
    queue_batch: int = Field(5, ge=1, description="memory bank rows = queue_batch · (mu + 1) · train.batch_size "
                                                  "(USB queue_batch 5, cifar10 config)")
    smoothing_alpha: float = Field(0.9, ge=0, le=1, description="p̂ = α · prediction + (1 − α) · bank "
                                                                "neighbours' probabilities (USB smoothing_alpha 0.9)")
    da_len: int = Field(32, ge=0, description="distribution alignment to uniform over the mean prediction of the "
                                              "last da_len batches (USB da_len 32, cifar10 config); 0 = off")


@register("comatch", CoMatchConfig)
class CoMatch(WeakStrongMethod):
    """CoMatch: FixMatch with memory-smoothed pseudo-labels and a graph-contrastive loss between two strong views'
    embeddings, its target the pseudo-label graph."""

    def __init__(self, cfg, backbone: nn.Module, info, num_unlabeled: int = 0) -> None:
        super().__init__(cfg, backbone, info, num_unlabeled)
        features = backbone.num_features
        self.projector = linear_relu_linear(features, cfg.proj_size)  # USB's CoMatch_Net.mlp_proj
        size = cfg.queue_batch * (cfg.mu + 1) * cfg.train.batch_size
        self.register_buffer("bank_embeddings", torch.zeros(size, cfg.proj_size))  # (M, D)
        self.register_buffer("bank_probs", torch.zeros(size, info.num_classes))  # (M, K)
        self.register_buffer("bank_pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("bank_full", torch.zeros((), dtype=torch.bool))

    def build_gate(self, cfg, num_classes: int, num_unlabeled: int) -> PseudoLabelGate:
        alignment = AlignmentQueue(num_classes, cfg.da_len) if cfg.da_len > 0 else None
        return PseudoLabelGate.from_config(cfg, num_classes, num_unlabeled, alignment)

    def features_and_embeddings(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (N, C, H, W) -> (logits (N, K), L2-normalised embeddings (N, proj_size)) of one backbone pass."""
        features = self.net.backbone(images)
        return self.net.head(features), F.normalize(self.projector(features).float(), dim=1)

    @torch.no_grad()
    def update_bank(self, embeddings: Tensor, probs: Tensor) -> None:
        """Write embeddings (N, D) and probs (N, K), gathered over ranks, at the pointer of the ring buffer,
        wrapping around to the start (USB drops the overflow; its default sizes never overflow mid-batch)."""
        embeddings = dist.gather_no_grad(embeddings.detach().float())
        probs = dist.gather_no_grad(probs.detach().float())
        size, n = self.bank_embeddings.shape[0], embeddings.shape[0]
        if n > size:  # only the newest rows fit
            embeddings, probs, n = embeddings[-size:], probs[-size:], size
        rows = (int(self.bank_pointer) + torch.arange(n, device=embeddings.device)) % size
        self.bank_embeddings[rows] = embeddings
        self.bank_probs[rows] = probs
        if int(self.bank_pointer) + n >= size:
            self.bank_full.fill_(True)
        self.bank_pointer.fill_((int(self.bank_pointer) + n) % size)

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        x, u_weak, u_strong = self.views(batch)
        u_strong_2 = self.strong_view(batch.u)
        if cfg.joint_forward:
            logits, embeddings = self.features_and_embeddings(torch.cat([x, u_weak, u_strong, u_strong_2]))
            b = x.shape[0]
            logits_x, embeddings_x = logits[:b], embeddings[:b]
            logits_w, logits_s, _ = logits[b:].chunk(3)
            embeddings_w, embeddings_s, embeddings_s2 = embeddings[b:].chunk(3)
        else:
            logits_x, embeddings_x = self.features_and_embeddings(x)
            logits_w, embeddings_w = self.features_and_embeddings(u_weak)
            logits_s, embeddings_s = self.features_and_embeddings(u_strong)
            _, embeddings_s2 = self.features_and_embeddings(u_strong_2)
        supervised = F.cross_entropy(logits_x.float(), batch.y)
        with torch.no_grad():
            self.gate.observe_labeled(torch.softmax(logits_x.detach().float(), dim=1))
            aligned = self.gate.align(torch.softmax(logits_w.detach().float(), dim=1))
            probs = aligned
            if bool(self.bank_full):
                probs = comatch_memory_smoothing(aligned, embeddings_w, self.bank_embeddings, self.bank_probs,
                                                 cfg.temperature, cfg.smoothing_alpha)
            weights = self.gate.weigh(probs, batch.u_index)
            self.track_pseudo_labels(probs, weights, batch.u_y)
            graph = comatch_pseudo_label_graph(probs, cfg.contrast_p_cutoff)
            one_hot = F.one_hot(batch.y, probs.shape[1]).float()
            self.update_bank(torch.cat([embeddings_w, embeddings_x]), torch.cat([aligned, one_hot]))
        unsupervised = consistency_loss(logits_s, probs, weights)
        contrast = comatch_contrastive_loss(embeddings_s, embeddings_s2, graph, cfg.temperature)
        loss = supervised + cfg.lambda_u * unsupervised + cfg.contrast_loss_ratio * contrast
        out = {"supervised_loss": supervised.detach(), "unsupervised_loss": unsupervised.detach(),
               "contrast_loss": contrast.detach(), "mask_rate": (weights > 0.5).float().mean()}
        return self.finish(loss, out, logits_s, weights)
