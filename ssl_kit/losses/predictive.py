"""Negative-free prediction losses: BYOL and SimSiam regress one view's prediction onto the other view's projection.

Both use the normalised MSE 2 − 2·cos(p, z). SimSiam's −cos(p, z) differs only by the affine map
2 − 2·cos, so the same function serves both (the optimum and gradient directions are the same; gradients are twice
SimSiam's). Neither loss stops the gradient itself: BYOL's z comes from the momentum network, SimSiam's must be
detached by the caller (`z.detach()`), which is the stop-gradient that method depends on.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ._checks import check_2d, check_same


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """2 − 2·cos(p_i, z_i) averaged over the batch. p: (N, D) predictions, z: (N, D) targets, neither normalised
    (they are L2-normalised here). z receives a gradient unless the caller detaches it. -> scalar in [0, 4]."""
    check_2d("p", p)
    check_2d("z", z)
    check_same("p", p, "z", z)
    cos = (F.normalize(p.float(), dim=1) * F.normalize(z.float(), dim=1)).sum(dim=1)
    return (2 - 2 * cos).mean()


def symmetric_byol_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """½·[byol_loss(p1, z2) + byol_loss(p2, z1)]: each view's prediction regresses the other view's target.
    p1, p2, z1, z2: (N, D). The BYOL paper sums the two terms (twice this value); SimSiam's
    ½·D(p1, z2) + ½·D(p2, z1) with D = −cos equals (this − 2) / 2. Detach z1, z2 for SimSiam. -> scalar."""
    return 0.5 * (byol_loss(p1, z2) + byol_loss(p2, z1))
