"""ABC (Lee et al. NeurIPS 2021, "ABC: auxiliary balanced classifier for class-imbalanced semi-supervised
learning") on FixMatch, as USB's `imb_algorithms/abc` adds it: a second linear head on the shared features, trained
on the same batch with Bernoulli masks that balance the classes it sees, and the head that predicts.

- labeled: each image is kept with probability min_c n_c / n_{y} (n_c: labeled images of class c), so every class
  counts alike in expectation;
- unlabeled: the auxiliary head's own weak-view prediction is the pseudo-label of its strong view, kept where it is
  confident (`abc_threshold`) and with probability 1 − progress · (1 − min_c n_c / n_ŷ) (no balancing at the
  start, the labeled balance at the end of training);
- loss: FixMatch's (on the ordinary head) + abc_loss_ratio · the masked cross-entropies of the auxiliary head.

The auxiliary head is the network's `head` (`BalancedHeadClassifier`): the test evaluation, the EMA model and
backbone.pt all predict with it, as USB's ABC evaluates `logits_aux`; FixMatch's head is `standard_head`.
(This file is not called abc.py so that it can never shadow the standard library's `abc`.)"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..data.loader import Batch
from ..losses import abc_keep_probs, abc_loss, abc_unlabeled_keep_probs, bernoulli_mask, consistency_loss
from ..models.heads import Classifier
from .base import Progress
from .registry import register
from .semi import USB_SGD, usb_imbalanced_mu
from .weak_strong import GatedConfig, WeakStrongMethod


class BalancedHeadClassifier(Classifier):
    """backbone + two linear heads on its features: `head` (the class-balanced one; forward(x) -> its logits (N, K),
    what is evaluated and saved) and `standard_head` (trained as the base method's classifier)."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__(backbone, num_classes)
        self.standard_head = nn.Linear(backbone.num_features, num_classes)

    def both(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """images (N, C, H, W) -> (standard logits (N, K), balanced logits (N, K)) from one backbone pass."""
        features = self.backbone(x)
        return self.standard_head(features), self.head(features)


def labeled_class_counts(labels: Optional[Tensor], num_classes: int, method: str) -> Tensor:
    """Labeled images per class (K,) float from the labeled split's labels (unknown labels, −1, left out); a clear
    error without them."""
    if labels is None:
        raise ValueError(f"{method} needs the labeled split's labels (labeled_labels) for its class distribution")
    labels = torch.as_tensor(labels).long()
    labels = labels[labels >= 0]
    if labels.numel() == 0:
        raise ValueError(f"{method}: the labeled split has no labeled image")
    return torch.bincount(labels, minlength=num_classes).float()[:num_classes]


def whole_set_counts(labels: Optional[Tensor], num_classes: int, num_unlabeled: int, method: str, why: str) -> Tensor:
    """For the methods that pseudo-label the whole unlabeled set against the labeled class distribution (DARP,
    CReST): labeled images per class (K,) float, with a clear error when there is no unlabeled set or a class has no
    labeled image (`why` says what that would break)."""
    if num_unlabeled < 1:
        raise ValueError(f"{method} needs an unlabeled set (num_unlabeled >= 1): it keeps a pseudo-label per "
                         f"unlabeled image")
    counts = labeled_class_counts(labels, num_classes, method)
    missing = [c for c in range(num_classes) if counts[c] == 0]
    if missing:
        raise ValueError(f"{method}: classes {missing} have no labeled image, so {why}; label at least one image of "
                         f"each class")
    return counts


class ABCConfig(GatedConfig):
    method: Literal["abc"]

    recommended = USB_SGD
    recommended_source = ("USB classic_cv_imb/fixmatch_abc configs: SGD Nesterov momentum 0.9, lr 0.03 (no batch "
                          "scaling), weight decay 5e-4, lr · cos(7πk/16K)")
    threshold: float = Field(0.95, ge=0, le=1, description="FixMatch's confidence cut-off on the standard head (USB "
                                                           "p_cutoff of its fixmatch_abc configs)")
    abc_threshold: float = Field(0.95, ge=0, le=1, description="confidence cut-off of the auxiliary head's own "
                                                               "pseudo-labels (USB abc_p_cutoff)")
    abc_loss_ratio: float = Field(1.0, ge=0, description="weight of the auxiliary head's loss (USB abc_loss_ratio)")
    mu: int = usb_imbalanced_mu()


class BalancedHeadMethod(WeakStrongMethod):
    """A weak/strong method with a standard and a class-balanced head on one backbone (`BalancedHeadClassifier`: the
    balanced head is evaluated and saved) that knows the labeled split's class counts (`labeled_counts` (K,)):
    ABC and ACR."""

    @classmethod
    def context_from(cls, cfg, data, load_record) -> dict:
        return {**super().context_from(cfg, data, load_record), "labeled_labels": data.train.labels[data.labeled]}

    def __init__(self, cfg, backbone: nn.Module, info, num_unlabeled: int = 0,
                 labeled_labels: Optional[Tensor] = None) -> None:
        super().__init__(cfg, backbone, info, num_unlabeled)
        self.net = BalancedHeadClassifier(backbone, info.num_classes)
        self.labeled_counts = labeled_class_counts(labeled_labels, info.num_classes, self.name)

    def head_modules(self) -> list[nn.Module]:
        return [self.net.head, self.net.standard_head]


@register("abc", ABCConfig)
class ABC(BalancedHeadMethod):
    """ABC: FixMatch plus an auxiliary head trained with class-balancing Bernoulli masks on labeled and confidently
    pseudo-labeled images; the auxiliary head is the one evaluated."""

    def __init__(self, cfg, backbone: nn.Module, info, num_unlabeled: int = 0,
                 labeled_labels: Optional[Tensor] = None) -> None:
        super().__init__(cfg, backbone, info, num_unlabeled, labeled_labels)
        self.register_buffer("keep", abc_keep_probs(self.labeled_counts))  # (K,) labeled keep-probabilities

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        (logits_x, aux_x), (logits_w, aux_w), (logits_s, aux_s) = self.forward_views(*self.views(batch),
                                                                                    network=self.net.both)
        supervised = F.cross_entropy(logits_x.float(), batch.y)
        probs, weights = self.gated_pseudo_labels(logits_x, logits_w, batch)
        unsupervised = consistency_loss(logits_s, probs.argmax(dim=1), weights)
        auxiliary, kept = self.auxiliary_loss(aux_x, batch.y, aux_w, aux_s, progress.fraction)
        out = {"supervised_loss": supervised.detach(), "unsupervised_loss": unsupervised.detach(),
               "abc_loss": auxiliary.detach(), "mask_rate": (weights > 0.5).float().mean(), "abc_mask_rate": kept}
        loss = supervised + cfg.lambda_u * unsupervised + cfg.abc_loss_ratio * auxiliary
        return self.finish(loss, out, logits_s, weights)

    def auxiliary_loss(self, aux_x: Tensor, labels: Tensor, aux_w: Tensor, aux_s: Tensor,
                       fraction: float) -> tuple[Tensor, Tensor]:
        """The auxiliary head's loss from its logits on the labeled (B, K), weak (N, K) and strong (N, K) images;
        `fraction` of training done sets the unlabeled balancing. -> (loss, fraction of unlabeled images kept)."""
        mask_labeled = bernoulli_mask(self.keep[labels])
        with torch.no_grad():
            confidence, pseudo = torch.softmax(aux_w.detach().float(), dim=1).max(dim=1)
            confident = (confidence >= self.cfg.abc_threshold).float()
            keep_unlabeled = abc_unlabeled_keep_probs(self.keep, min(max(fraction, 0.0), 1.0))
            mask_unlabeled = confident * bernoulli_mask(keep_unlabeled[pseudo])
        loss = abc_loss(aux_x, labels, aux_s, pseudo, mask_labeled, mask_unlabeled)
        return loss, mask_unlabeled.mean()
