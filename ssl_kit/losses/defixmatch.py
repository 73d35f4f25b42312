"""DeFixMatch (Schmutz et al. 2022, "Don't fear the unlabelled: safe semi-supervised learning via debiasing"): the
pseudo-label loss of the unlabeled batch is debiased by subtracting the same loss computed on the labeled batch
(its weak view's pseudo-labels, its strong view's logits), L = L_s + λ_u (L_u − L_u^lab). On labeled images the
pseudo-label loss's expectation is what the unlabeled term adds on average, so the difference is an unbiased
estimate of zero on the labeled distribution (the risk stays an unbiased estimate of the supervised one).
USB (semilearn `defixmatch`) is the reference for reductions."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ._checks import check_2d, check_class_dim
from .pseudo_label import consistency_loss


def defixmatch_loss(logits_strong_u: Tensor, targets_u: Tensor, logits_strong_x: Tensor, targets_x: Tensor,
                    weights_u: Optional[Tensor] = None, weights_x: Optional[Tensor] = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """The debiased pseudo-label term L_u − L_u^lab.
    L_u = mean over the N unlabeled rows of w_u · CE(logits_strong_u, targets_u); L_u^lab = mean over the B labeled
    rows of w_x · CE(logits_strong_x, targets_x), where targets_x are the labeled batch's own pseudo-labels (its weak
    view's argmax or distribution, not its true labels) and w_x their confidence mask. Masked-out rows count as zeros
    (FixMatch's convention, USB's `consistency_loss(..., 'ce', mask)`). Targets and weights get no gradient.
    logits_strong_u: (N, K); targets_u: (N,) int64 or (N, K); logits_strong_x: (B, K); targets_x: (B,) or (B, K);
    weights: (N,), (B,) or None (all 1). -> (L_u − L_u^lab, L_u, L_u^lab), scalars. The caller weights the first by
    λ_u (USB `ulb_loss_ratio` 0.5); the difference may be negative."""
    check_2d("logits_strong_u", logits_strong_u)
    check_2d("logits_strong_x", logits_strong_x)
    check_class_dim("logits_strong_u", logits_strong_u, "logits_strong_x", logits_strong_x)
    unlabeled = consistency_loss(logits_strong_u, targets_u, weights_u)
    labeled = consistency_loss(logits_strong_x, targets_x, weights_x)
    return unlabeled - labeled, unlabeled, labeled
