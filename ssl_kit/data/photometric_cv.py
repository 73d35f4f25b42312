"""A ContrastiveView's photometric part on the CPU, image by image with OpenCV's float32 kernels: what streaming
DataLoader workers run when the training device is the CPU (`data.photometric: workers|auto`).

The ops and their random numbers are those of `augment.py` (a `PhotometricDraw`); only the arithmetic differs:
OpenCV's vectorised single-image kernels (HSV conversion, separable filter, luma) instead of torch's batched
elementwise passes — equal before rounding within 1e-4 (the blur cuts its taps at ±⌈4σ⌉), 6-7× less CPU at 224 px
(benchmarks/photometric_cost.py).
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from torch import Tensor

from .photometric_draws import PhotometricDraw, gaussian_taps

cv2.setNumThreads(1)  # workers are the parallelism; OpenCV's own threads would oversubscribe the cores


def _luma(y: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 -> (H, W) luma; (H, W) images are their own luma."""
    return cv2.cvtColor(y, cv2.COLOR_RGB2GRAY) if y.ndim == 3 else y


def _clamp(y: np.ndarray) -> np.ndarray:
    return np.clip(y, 0, 1, out=y)


def _blend_with_luma(y: np.ndarray, factor: float) -> np.ndarray:
    """Saturation: factor·y + (1 − factor)·luma(y), clamped. (H, W, 3) -> same."""
    return _clamp(cv2.addWeighted(y, factor, cv2.cvtColor(_luma(y), cv2.COLOR_GRAY2RGB), 1 - factor, 0.0, dst=y))


def _shift_hue(y: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the hue of (H, W, 3) RGB in [0, 1] by `shift` turns (HSV round trip; augment.adjust_hue)."""
    hsv = cv2.cvtColor(y, cv2.COLOR_RGB2HSV)  # hue in degrees [0, 360)
    hue = hsv[..., 0]
    hue += 360.0 * (shift % 1.0)  # in [0, 720): OpenCV's HSV -> RGB wraps it
    return _clamp(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))


def _jitter(y: np.ndarray, brightness: float, contrast: float, colour, hue) -> np.ndarray:
    """augment.apply_color_jitter on one image: brightness, contrast, saturation, hue, each clamped."""
    y *= brightness
    _clamp(y)
    mean = cv2.mean(_luma(y))[0]
    y *= contrast
    y += (1 - contrast) * mean
    _clamp(y)
    if colour is None:
        return y
    return _shift_hue(_blend_with_luma(y, colour), hue)


def _solarize(y: np.ndarray) -> np.ndarray:
    """1 − y where y ≥ 0.5, else y: 0.5 − |y − 0.5| (the same within float rounding), in place."""
    y -= 0.5
    np.abs(y, out=y)
    return np.subtract(np.float32(0.5), y, out=y)


def _blur_taps(draw: PhotometricDraw) -> list[np.ndarray] | None:
    """Each image's 1-D Gaussian taps, cut to ±⌈4σ⌉ (the weights beyond hold < 1e-4 of the sum) and renormalised:
    equal to the full kernel of augment.gaussian_blur within 1e-4, far below a uint8 level."""
    if draw.blur is None:
        return None
    full = gaussian_taps(draw.blur.kernel, draw.blur.sigma.double(), torch.float64)  # (N, kernel)
    radius = draw.blur.kernel // 2
    taps = []
    for weights, sigma in zip(full, draw.blur.sigma.tolist()):
        keep = min(radius, math.ceil(4 * sigma))
        cut = weights[radius - keep:radius + keep + 1]
        taps.append((cut / cut.sum()).to(torch.float32).numpy())
    return taps


def _one_image(y: np.ndarray, i: int, draw: PhotometricDraw, taps) -> np.ndarray:
    """The photometric part of image i of the draw. y: float32 (H, W, 3) or (H, W) in [0, 1] -> same."""
    jitter = draw.jitter
    if jitter is not None and jitter.apply[i]:
        colour = None if jitter.colour is None else float(jitter.colour[i])
        hue = None if jitter.hue is None else float(jitter.hue[i])
        y = _jitter(y, float(jitter.brightness[i]), float(jitter.contrast[i]), colour, hue)
    if draw.grayscale is not None and draw.grayscale[i]:
        y = cv2.cvtColor(_luma(y), cv2.COLOR_GRAY2RGB)
    if taps is not None and draw.blur.apply[i]:
        y = cv2.sepFilter2D(y, -1, taps[i], taps[i], borderType=cv2.BORDER_REFLECT_101)
    if draw.solarize is not None and draw.solarize[i]:
        y = _solarize(y)
    return y


def photometric_uint8_cv(x: Tensor, draw: PhotometricDraw) -> Tensor:
    """uint8 (N, C, S, S) CPU crops -> uint8 (N, C, S, S): each image augmented as `draw` says (C = 1 or 3), then
    rounded to the nearest level (half to even, as torch.round)."""
    n, c, _, _ = x.shape
    taps = _blur_taps(draw)
    out = torch.empty_like(x)
    for i in range(n):
        planes = [x[i, k].numpy() for k in range(c)]
        unit = (cv2.merge(planes) if c > 1 else planes[0]).astype(np.float32)  # (S, S, C) or (S, S)
        unit /= np.float32(255)  # as augment.to_unit_float
        levels = cv2.convertScaleAbs(_one_image(unit, i, draw, taps), alpha=255.0)  # round(255·y) in [0, 255]
        for k, plane in enumerate(cv2.split(levels) if c > 1 else [levels]):
            np.copyto(out[i, k].numpy(), plane)
    return out
