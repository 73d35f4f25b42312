"""RandAugment (Cubuk et al. 2020) as FixMatch uses it, and Cutout: batched, every image its own ops and
magnitudes. uint8/float (N, C, H, W) -> float in [0, 1]."""
from __future__ import annotations

import math

import kornia
import torch
from torch import Tensor

from .augment import color_enhance, contrast_enhance, uniform, warp


def autocontrast(x: Tensor, m: Tensor) -> Tensor:
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(high > low, 1.0 / (high - low).clamp_min(1e-6), torch.ones_like(high))
    return ((x - low) * scale).clamp(0, 1)


def _equalize(x: Tensor, m: Tensor) -> Tensor:
    return kornia.enhance.equalize(x)


def _brightness(x: Tensor, m: Tensor) -> Tensor:
    return (x * _signed_factor(m).view(-1, 1, 1, 1)).clamp(0, 1)


def _color(x: Tensor, m: Tensor) -> Tensor:
    return color_enhance(x, _signed_factor(m))


def _contrast(x: Tensor, m: Tensor) -> Tensor:
    return contrast_enhance(x, _signed_factor(m))


def _sharpness(x: Tensor, m: Tensor) -> Tensor:
    return kornia.enhance.sharpness(x, _signed_factor(m)).clamp(0, 1)


def _posterize(x: Tensor, m: Tensor) -> Tensor:
    bits = (8 - (m * 4).round()).clamp(4, 8)  # 8..4 bits kept
    return kornia.enhance.posterize(x, bits)


def _solarize(x: Tensor, m: Tensor) -> Tensor:
    threshold = (1.0 - m).view(-1, 1, 1, 1)
    return torch.where(x >= threshold, 1.0 - x, x)


def _signed_factor(m: Tensor) -> Tensor:
    """Magnitude m in [0, 1] -> enhancement factor 1 ± 0.9·m with a random sign (identity at m = 0)."""
    sign = torch.where(torch.rand_like(m) < 0.5, -1.0, 1.0)
    return 1.0 + sign * 0.9 * m


def geometric_matrix(kind: str, m: Tensor, sign: Tensor) -> Tensor:
    """The affine map (N, 2, 3), in normalised coordinates, of geometric op `kind` with magnitudes m (N,) in [0, 1]
    and directions sign (N,) ±1: rotate up to 30°, shear up to 0.3, translate up to 30% of the size."""
    n = m.shape[0]
    matrix = torch.zeros(n, 2, 3, device=m.device)
    matrix[:, 0, 0] = 1.0
    matrix[:, 1, 1] = 1.0
    if kind == "rotate":  # up to 30 degrees
        angle = sign * m * math.radians(30)
        matrix[:, 0, 0], matrix[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
        matrix[:, 1, 0], matrix[:, 1, 1] = torch.sin(angle), torch.cos(angle)
    elif kind == "shear_x":
        matrix[:, 0, 1] = sign * m * 0.3
    elif kind == "shear_y":
        matrix[:, 1, 0] = sign * m * 0.3
    elif kind == "translate_x":  # up to 30% of the size
        matrix[:, 0, 2] = sign * m * 0.6
    else:
        matrix[:, 1, 2] = sign * m * 0.6
    return matrix


def _random_sign(n: int, device) -> Tensor:
    return torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0)


def _geometric(kind: str):
    def op(x: Tensor, m: Tensor) -> Tensor:
        return warp(x, geometric_matrix(kind, m, _random_sign(x.shape[0], x.device)), "zeros")

    return op


GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
RANDAUGMENT_OPS = {
    "identity": lambda x, m: x,
    "autocontrast": autocontrast,
    "equalize": _equalize,
    "brightness": _brightness,
    "color": _color,
    "contrast": _contrast,
    "sharpness": _sharpness,
    "posterize": _posterize,
    "solarize": _solarize,
    "rotate": _geometric("rotate"),
    "shear_x": _geometric("shear_x"),
    "shear_y": _geometric("shear_y"),
    "translate_x": _geometric("translate_x"),
    "translate_y": _geometric("translate_y"),
}


def rand_augment(x: Tensor, num_ops: int, magnitude_max: float) -> Tensor:
    """RandAugment as in FixMatch: each sample gets `num_ops` ops drawn uniformly, each with its own magnitude
    in [0.05, magnitude_max]. x: float (N, C, H, W) in [0, 1] -> same shape, in [0, 1].

    Each op runs only on the rows that drew it; within a round the rows that drew any geometric op are warped in
    one `grid_sample` call (their maps stacked), with the random directions drawn op by op in the same order as
    applying the ops one at a time, so the result equals `RANDAUGMENT_OPS[op](rows, m)` op by op."""
    names = list(RANDAUGMENT_OPS)
    out = x.clone()
    n = x.shape[0]
    for _ in range(num_ops):
        choice = torch.randint(len(names), (n,), device=x.device)
        magnitude = uniform(n, 0.05, max(0.05, magnitude_max), x.device)
        order = torch.argsort(choice, stable=True)
        counts = torch.bincount(choice, minlength=len(names)).tolist()
        geometric_rows, matrices = [], []
        for name, rows in zip(names, order.split(counts)):
            if rows.numel() == 0 or name == "identity":
                continue
            m = magnitude.index_select(0, rows)
            if name in GEOMETRIC_OPS:
                matrices.append(geometric_matrix(name, m, _random_sign(rows.numel(), x.device)))
                geometric_rows.append(rows)
            else:
                out.index_copy_(0, rows, RANDAUGMENT_OPS[name](out.index_select(0, rows), m).clamp(0, 1))
        if geometric_rows:
            rows = torch.cat(geometric_rows)
            out.index_copy_(0, rows, warp(out.index_select(0, rows), torch.cat(matrices), "zeros").clamp(0, 1))
    return out


def cutout(x: Tensor, max_fraction: float, fill: float = 0.5) -> Tensor:
    """Fill a square of side U(0, max_fraction)·size at a uniformly random centre with `fill`, per sample."""
    if max_fraction <= 0:
        return x
    n, _, h, w = x.shape
    side = torch.rand(n, device=x.device) * max_fraction * min(h, w)
    cy = torch.rand(n, device=x.device) * h
    cx = torch.rand(n, device=x.device) * w
    ys = torch.arange(h, device=x.device).view(1, h, 1) + 0.5
    xs = torch.arange(w, device=x.device).view(1, 1, w) + 0.5
    inside = ((ys - cy.view(-1, 1, 1)).abs() <= side.view(-1, 1, 1) / 2) & \
             ((xs - cx.view(-1, 1, 1)).abs() <= side.view(-1, 1, 1) / 2)
    return x.masked_fill(inside.unsqueeze(1), fill)
