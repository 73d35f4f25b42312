"""CRMatch (Fan, Kukleva, Dai & Schiele 2021, "Revisiting consistency regularization for deep semi-supervised
learning"): FixMatch's class-level consistency plus a feature-level term, FeatDistLoss, that *increases* the distance
between the weak and strong views' features where the pseudo-label is confident (class predictions stay consistent
while the features keep the augmentation's information), and rotation prediction on unlabeled images. USB
(semilearn `crmatch`) is the reference."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from ._checks import check_2d, check_same


def crmatch_feature_distance_loss(features_strong: Tensor, features_weak: Tensor,
                                  weights: Optional[Tensor] = None) -> Tensor:
    """FeatDistLoss: mean over the N rows of w_n · max(0, cos(f_strong_n, f_weak_n)), i.e. USB's
    `cosine_embedding_loss(ds_s, ds_w, target −1, margin 0)` masked by the confidence mask: features whose cosine
    similarity is positive are pushed apart, orthogonal or opposite ones cost nothing. Gradient flows into both views
    (USB's joint forward); weights get none. features: (N, D); weights: (N,) or None (all 1). -> scalar."""
    check_2d("features_strong", features_strong)
    check_2d("features_weak", features_weak)
    check_same("features_strong", features_strong, "features_weak", features_weak)
    n = features_strong.shape[0]
    cosine = F.cosine_similarity(features_strong.float(), features_weak.float(), dim=1, eps=1e-8)
    per_sample = cosine.clamp_min(0.0)
    if weights is None:
        return per_sample.mean()
    if not hasattr(weights, "shape") or weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {tuple(getattr(weights, 'shape', ()))}")
    return (per_sample * weights.detach().float()).mean()

