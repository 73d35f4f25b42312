"""CRMatch (Fan, Kukleva, Dai & Schiele 2021, "Revisiting consistency regularization for deep semi-supervised
learning"), as USB runs it (`crmatch`): FixMatch's confident hard pseudo-label CE on the strong view, plus

- FeatDistLoss (`crmatch_feature_distance_loss`): a linear head `ds_head` maps features of the weak and strong views
  and their positive cosine similarity is penalised where the pseudo-label is confident: predictions stay consistent
  while the features are pushed apart (the paper's finding; USB's cosine-embedding target −1);
- rotation prediction: the weak views of B unlabeled images (B = the labeled batch size, USB's RotNet loader with
  the labeled transform) rotated by 0/90/180/270° are classified by an MLP head `rot_head` (CE, weight
  rot_loss_ratio; 0 drops the head and the rotated images, as USB does for text and audio).

L = CE(labeled) + λ_u L_u + L_dist + rot_loss_ratio · L_rot. One joint pass over cat([labeled, rotated, weak,
strong]). USB's `ds_classifier` reads the flattened last feature *map* of its CNNs (a Linear from C·h·w) and the
pooled feature of its ViTs; our backbones expose the pooled feature only, so `ds_head` is Linear(F, F) on it for
every backbone (USB's ViT form)."""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..data.loader import Batch
from ..losses import consistency_loss, crmatch_feature_distance_loss
from ..models.heads import linear_relu_linear
from .base import Progress
from .registry import register
from .semi import USB_SGD
from .weak_strong import GatedConfig, WeakStrongMethod


class CRMatchConfig(GatedConfig):
    """CRMatch keys; defaults from USB's `crmatch` (algorithm arguments and its image configs): p_cutoff 0.95,
    hard_label True, rot_loss_ratio 1.0 (0 in its text/audio configs), ulb_loss_ratio 1.0, uratio 7 (CIFAR)."""

    method: Literal["crmatch"]

    recommended = USB_SGD
    recommended_source = ("USB's CRMatch config (classic_cv, the FixMatch setting): SGD Nesterov momentum 0.9, "
                          "lr 0.03 (no batch scaling), weight decay 5e-4, lr · cos(7πk/16K)")
    threshold: float = Field(0.95, ge=0, le=1, description="confidence cut-off of the pseudo-labels, also masking "
                                                           "FeatDistLoss (USB p_cutoff)")
    rot_loss_ratio: float = Field(1.0, ge=0, description="weight of the rotation-prediction loss; 0: no rotation "
                                                         "head (USB rot_loss_ratio)")


def rotation_batch(images: Tensor) -> tuple[Tensor, Tensor]:
    """RotNet's four views of each image: cat([x, rot90(x), rot180(x), rot270(x)]) (counter-clockwise, USB's
    `rotate_img`) and labels [0]*N + [1]*N + [2]*N + [3]*N. images: (N, C, S, S), square.
    -> (rotated (4N, C, S, S), labels (4N,) int64)."""
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"CRMatch rotates square images (N, C, S, S), got shape {tuple(images.shape)}")
    n = images.shape[0]
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
    return rotated, torch.arange(4, device=images.device).repeat_interleave(n)


@register("crmatch", CRMatchConfig)
class CRMatch(WeakStrongMethod):
    """CRMatch: FixMatch + FeatDistLoss (weak and strong features pushed apart where confident) + rotation
    prediction on unlabeled images."""

    def __init__(self, cfg, backbone: nn.Module, info, num_unlabeled: int = 0) -> None:
        super().__init__(cfg, backbone, info, num_unlabeled)
        features = backbone.num_features
        self.ds_head = nn.Linear(features, features)  # USB's ds_classifier (ViT form, see the module docstring)
        self.rot_head: Optional[nn.Module] = None
        if cfg.rot_loss_ratio > 0:  # USB's rot_classifier
            self.rot_head = linear_relu_linear(features, 4)

    def heads(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """images (M, C, H, W) -> (class logits (M, K), ds features (M, F), rotation logits (M, 4), or (M, 0)
        without the rotation head) of one backbone pass."""
        features = self.net.backbone(images)
        rotation = self.rot_head(features) if self.rot_head is not None else features[:, :0]
        return self.net.head(features), self.ds_head(features), rotation

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        x, u_weak, u_strong = self.views(batch)
        b = x.shape[0]
        rotated, rotation_labels = rotation_batch(self.weak_view(batch.u[:b])) if self.rot_head is not None \
            else (x[:0], None)
        first, (logits_w, ds_w, _), (logits_s, ds_s, _) = self.forward_views(torch.cat([x, rotated]), u_weak,
                                                                              u_strong, self.heads)
        logits_x, logits_rot = first[0][:b], first[2][b:]
        supervised = F.cross_entropy(logits_x.float(), batch.y)
        probs, weights = self.gated_pseudo_labels(logits_x, logits_w, batch)
        unsupervised = consistency_loss(logits_s, probs.argmax(dim=1), weights)
        distance = crmatch_feature_distance_loss(ds_s, ds_w, weights)
        loss = supervised + cfg.lambda_u * unsupervised + distance
        out = {"supervised_loss": supervised.detach(), "unsupervised_loss": unsupervised.detach(),
               "feature_distance_loss": distance.detach(), "mask_rate": (weights > 0.5).float().mean()}
        if rotation_labels is not None:
            rotation = F.cross_entropy(logits_rot.float(), rotation_labels)
            loss = loss + cfg.rot_loss_ratio * rotation
            out["rotation_loss"] = rotation.detach()
        return self.finish(loss, out, logits_s, weights)
