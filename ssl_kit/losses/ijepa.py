"""I-JEPA (Assran et al. 2023): regression of the target encoder's patch representations.

With ŝ the predictor's output for the patches of the target blocks and s the target encoder's output there,
normalised over the feature dimension without an affine part (the reference's F.layer_norm(h, (D,))):

    smooth_l1:  mean over every element of  ½·d²/β if |d| < β else |d| − ½·β,   d = ŝ − LN(s)   (reference code)
    l2:         mean over every element of  d²   (the paper's eq. 1, Σ over patches of ‖ŝ − s‖², up to the constant
                factor of patches × D)

Every rank's loss is a mean over its own elements and the gradients are averaged by DDP, so the global batch needs
no gathering (the reference all-reduces the loss for logging only)."""
from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from ._checks import check_same, full_precision

IJEPA_LOSSES = ("smooth_l1", "l2")


def ijepa_loss(predictions: Tensor, targets: Tensor, loss: Literal["smooth_l1", "l2"] = "smooth_l1",
               beta: float = 1.0) -> Tensor:
    """predictions, targets: (..., D), e.g. (N, M, T, D) for N images, M target blocks of T patches; the targets are
    the raw target-encoder outputs: they are layer-normalised over D (no affine, eps 1e-5) and detached here.
    loss: 'smooth_l1' (Huber with threshold `beta`, the reference code) or 'l2' (squared error). -> scalar, the mean
    over all elements."""
    check_same("predictions", predictions, "targets", targets)
    if predictions.ndim < 2 or predictions.numel() == 0:
        raise ValueError(f"predictions must be a non-empty (..., D) tensor, got shape {tuple(predictions.shape)}")
    if loss not in IJEPA_LOSSES:
        raise ValueError(f"loss must be one of {IJEPA_LOSSES}, got {loss!r}")
    if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and beta > 0):
        raise ValueError(f"beta must be a number > 0, got {beta!r}")
    with full_precision(predictions):
        normalised = F.layer_norm(targets.detach().float(), (targets.shape[-1],))
        if loss == "l2":
            return F.mse_loss(predictions.float(), normalised)
        return F.smooth_l1_loss(predictions.float(), normalised, beta=beta)
