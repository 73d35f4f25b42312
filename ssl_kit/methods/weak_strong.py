"""The base of the weak/strong methods (FixMatch and every successor that trains a strong view of an unlabeled image
towards a pseudo-label from its weak view: UDA, Dash, AdaMatch, SimMatch, ...). It owns what they all set up:

- the strong view (`strong:` keys, RandAugment + Cutout) beside the weak view every classifier method has;
- the joint forward of labeled + weak + strong images (`joint_forward:`; one pass, so batch norm sees the labeled and
  the unlabeled images together, as the reference implementations do) and its split back into the three parts;
- pseudo-label gating (`PseudoLabelGate`: distribution alignment, then a swappable threshold policy, both
  checkpointed): `threshold:` + `threshold_policy:` keys for the methods whose config derives from `GatedConfig`;
- the policy's extra loss term (FreeMatch's fairness) and its thresholds in the epoch log.

A method states only what is its own: its targets, its losses and any extra state (a memory bank, a schedule)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from pydantic import Field
from torch import Tensor, nn

from ..config import StrongAugConfig
from ..data.loader import Batch
from ..data.views import StrongView
from .pseudo_gate import PseudoLabelGate
from .semi import SemiSupervisedConfig, SemiSupervisedMethod
from .thresholds import ThresholdConfig


class WeakStrongConfig(SemiSupervisedConfig):
    """Keys of every method that trains a strong view towards its weak view's pseudo-label."""

    strong: StrongAugConfig = Field(default_factory=StrongAugConfig)
    joint_forward: bool = Field(True, description="labeled + both unlabeled views in one forward pass")


class GatedConfig(WeakStrongConfig):
    """A weak/strong method whose pseudo-labels pass a confidence gate. Each method states its own `threshold`
    field (its paper's default differs: FixMatch 0.95, UDA 0.8, AdaMatch 0.9, ...)."""

    threshold_policy: ThresholdConfig = Field(default_factory=ThresholdConfig)


def split_joint(outputs: Tensor, num_labeled: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rows of a joint pass over cat([labeled (B), weak (N), strong (N)]) -> (labeled (B, ...), weak (N, ...),
    strong (N, ...))."""
    weak, strong = outputs[num_labeled:].chunk(2)
    return outputs[:num_labeled], weak, strong


class WeakStrongMethod(SemiSupervisedMethod):
    """SemiSupervisedMethod with a strong view (`self.strong_view`) and, for GatedConfig stages, a pseudo-label gate
    (`self.gate`; None otherwise). Subclasses may override `build_gate` (their own alignment) and call:
    `views(batch)`, `forward_views(...)`, `gated_pseudo_labels(...)`, `finish(...)`."""

    def __init__(self, cfg, backbone: nn.Module, info, num_unlabeled: int = 0) -> None:
        super().__init__(cfg, backbone, info, num_unlabeled)
        self.strong_view = StrongView(self.normalize, cfg.strong, cfg.data.translate, cfg.data.hflip)
        self.gate = self.build_gate(cfg, info.num_classes, num_unlabeled)
        self.register_load_state_dict_pre_hook(_renamed_gate_keys)

    def build_gate(self, cfg, num_classes: int, num_unlabeled: int) -> Optional[PseudoLabelGate]:
        """The pseudo-label gate of a GatedConfig stage (alignment from threshold_policy); None for other stages."""
        return PseudoLabelGate.from_config(cfg, num_classes, num_unlabeled) if isinstance(cfg, GatedConfig) else None

    @property
    def policy(self):
        """The gate's threshold policy (thresholds(), state buffers)."""
        return self.gate.policy

    @property
    def alignment(self):
        """The gate's distribution alignment (None when off)."""
        return self.gate.alignment

    def threshold_metrics(self) -> dict:
        return self.gate.threshold_metrics() if self.gate is not None else {}

    def views(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """uint8 batch -> normalised (weak labeled (B, C, H, W), weak unlabeled (N, C, H, W), strong unlabeled
        (N, C, H, W)), drawn in this order (the random stream every method of this family shares)."""
        return self.weak_view(batch.x), self.weak_view(batch.u), self.strong_view(batch.u)

    def forward_views(self, x: Tensor, u_weak: Tensor, u_strong: Tensor,
                      network: Optional[Callable[[Tensor], Tensor]] = None) -> tuple[Tensor, Tensor, Tensor]:
        """`network` (default: the classifier) over the three image sets -> its outputs for labeled (B, ...), weak
        (N, ...) and strong (N, ...) images: one pass over their concatenation with joint_forward, else three
        passes. A network returning a tuple of tensors gives a tuple per image set."""
        network = self.net if network is None else network
        if not self.cfg.joint_forward:
            return network(x), network(u_weak), network(u_strong)
        outputs = network(torch.cat([x, u_weak, u_strong]))
        if isinstance(outputs, tuple):
            return tuple(zip(*(split_joint(output, x.shape[0]) for output in outputs)))
        return split_joint(outputs, x.shape[0])

    @torch.no_grad()
    def gated_pseudo_labels(self, logits_x: Tensor, logits_w: Tensor, batch: Batch,
                            temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        """The gate on a step's logits: labeled logits (B, K) are observed (relative thresholds, labeled alignment
        target), the weak logits (N, K) become probabilities softmax(logits / T), aligned, and weighted by the
        threshold policy, which then updates its state; pseudo-label quality is tracked against the hidden labels.
        -> (probs (N, K), weights (N,) in [0, 1]). No gradient."""
        self.gate.observe_labeled(torch.softmax(logits_x.detach().float() / temperature, dim=1))
        probs, weights = self.gate(torch.softmax(logits_w.detach().float() / temperature, dim=1), batch.u_index)
        self.track_pseudo_labels(probs, weights, batch.u_y)
        return probs, weights

    def finish(self, loss: Tensor, out: dict, logits_s: Tensor, weights: Tensor) -> dict:
        """A step's outputs with the gate's extra loss (FreeMatch fairness) added to `loss`. -> out with "loss"."""
        if self.gate is None:
            out["loss"] = loss
            return out
        return self.with_policy_loss(self.gate, loss, out, logits_s, weights)


class LabeledBankMethod(WeakStrongMethod):
    """A weak/strong method that keeps a bank over the labeled set (SimMatch, SimMatchV2): its constructor takes the
    stage's labeled rows `labeled_index` (L,) and their labels `labeled_labels` (L,)."""

    @classmethod
    def context_from(cls, cfg, data, load_record) -> dict:
        return {**super().context_from(cfg, data, load_record), "labeled_index": data.labeled,
                "labeled_labels": data.train.labels[data.labeled]}


def _renamed_gate_keys(module, state_dict, prefix, *args) -> None:
    """Checkpoints written before the weak/strong base kept the gate's state at `policy.*` / `alignment.*`: load
    them into `gate.policy.*` / `gate.alignment.*` (a resumed run continues exactly)."""
    for old in ("policy.", "alignment."):
        for key in [k for k in state_dict if k.startswith(prefix + old)]:
            state_dict[prefix + "gate." + key[len(prefix):]] = state_dict.pop(key)
