"""The random numbers of a ContrastiveView's photometric part (`PhotometricDraw`) and the Gaussian blur's taps:
what the batched torch ops (augment.py) and the per-image OpenCV ops (photometric_cv.py) share, below both, so
neither has to import the other."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class JitterDraw(NamedTuple):
    """Colour jitter's random numbers for N images: which jitter (bool (N,)) and their factors (N,); colour and hue
    are None for 1-channel images."""
    apply: Tensor
    brightness: Tensor
    contrast: Tensor
    colour: Optional[Tensor]
    hue: Optional[Tensor]


class BlurDraw(NamedTuple):
    """Gaussian blur's random numbers for N images: sigmas (N,), which blur (bool (N,)), the odd kernel size."""
    sigma: Tensor
    apply: Tensor
    kernel: int


class PhotometricDraw(NamedTuple):
    """Every random number of one ContrastiveView's photometric part for N images, drawn in the order the ops run
    (jitter, grayscale, blur, solarize), so the batched torch ops and the per-image OpenCV ops
    (`photometric_cv`) apply the same augmentation."""
    jitter: Optional[JitterDraw]
    grayscale: Optional[Tensor]
    blur: Optional[BlurDraw]
    solarize: Optional[Tensor]


def gaussian_taps(kernel: int, sigmas: Tensor, dtype) -> Tensor:
    """Normalised 1-D Gaussian weights (N, kernel) centred on the middle tap, one row per sigma (N,)."""
    taps = torch.arange(kernel, device=sigmas.device, dtype=dtype) - kernel // 2
    weights = torch.exp(-taps.square() / (2 * sigmas.to(dtype).view(-1, 1).square()))
    return weights / weights.sum(1, keepdim=True)
