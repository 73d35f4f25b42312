"""Corruption robustness (in the spirit of ImageNet-C / CIFAR-10-C): the test images of any dataset, corrupted
with kornia at severities 1–5, evaluated like another target domain.

Every corruption maps uint8 images (N, C, H, W) to uint8 images of the same shape, deterministically for a given
seed. Severity parameters follow Hendrycks & Dietterich (2019) where they carry over to small images; blur radii
scale with the image size so that severity means the same thing at 8 px and at 224 px.
"""
from __future__ import annotations

from typing import Callable

import kornia
import torch
from torch import Tensor

from ..config import CORRUPTION_NAMES
from ..errors import DataError

SEVERITIES = (1, 2, 3, 4, 5)

# per-severity parameters (index severity − 1)
_NOISE_STD = (0.08, 0.12, 0.18, 0.26, 0.38)
_SHOT_PHOTONS = (60.0, 25.0, 12.0, 5.0, 3.0)
_BLUR_SIGMA = (0.6, 0.9, 1.2, 1.6, 2.0)  # pixels at 32 px, scaled with the size (never below that)
_CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)
_BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)
_PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)
_JPEG_QUALITY = (80.0, 65.0, 58.0, 50.0, 40.0)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_noise(x: Tensor, severity: int, seed: int) -> Tensor:
    noise = torch.randn(x.shape, generator=_generator(seed)) * _NOISE_STD[severity - 1]
    return x + noise


def shot_noise(x: Tensor, severity: int, seed: int) -> Tensor:
    photons = _SHOT_PHOTONS[severity - 1]
    return torch.poisson(x.clamp(0, 1) * photons, generator=_generator(seed)) / photons


def _odd(n: float) -> int:
    return max(3, int(n) // 2 * 2 + 1)


def gaussian_blur(x: Tensor, severity: int, seed: int) -> Tensor:
    sigma = _BLUR_SIGMA[severity - 1] * max(1.0, x.shape[-1] / 32)
    size = _odd(4 * sigma + 1)
    return kornia.filters.gaussian_blur2d(x, (size, size), (sigma, sigma), border_type="replicate")


def motion_blur(x: Tensor, severity: int, seed: int) -> Tensor:
    size = _odd((2 * severity + 1) * max(1.0, x.shape[-1] / 32))
    angle = torch.rand(x.shape[0], generator=_generator(seed)) * 360 - 180
    direction = torch.zeros(x.shape[0])
    return kornia.filters.motion_blur(x, size, angle, direction, border_type="replicate")


def contrast(x: Tensor, severity: int, seed: int) -> Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _CONTRAST[severity - 1] + mean


def brightness(x: Tensor, severity: int, seed: int) -> Tensor:
    return kornia.enhance.adjust_brightness(x, _BRIGHTNESS[severity - 1], clip_output=False)


def pixelate(x: Tensor, severity: int, seed: int) -> Tensor:
    size = x.shape[-1]
    small = max(2, int(round(size * _PIXELATE[severity - 1])))
    down = torch.nn.functional.interpolate(x, size=(small, small), mode="area")
    return torch.nn.functional.interpolate(down, size=(size, size), mode="nearest")


def jpeg(x: Tensor, severity: int, seed: int) -> Tensor:
    """JPEG compression (kornia's differentiable codec needs 3 channels and sides divisible by 16)."""
    n, c, h, w = x.shape
    pad_h, pad_w = (-h) % 16, (-w) % 16
    rgb = x.expand(n, 3, h, w) if c == 1 else x
    rgb = torch.nn.functional.pad(rgb, (0, pad_w, 0, pad_h), mode="replicate")
    quality = torch.full((n,), _JPEG_QUALITY[severity - 1])
    out = kornia.enhance.jpeg_codec_differentiable(rgb.clamp(0, 1), quality)[..., :h, :w]
    return out.mean(dim=1, keepdim=True) if c == 1 else out


CORRUPTIONS: dict[str, Callable[[Tensor, int, int], Tensor]] = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "gaussian_blur": gaussian_blur,
    "motion_blur": motion_blur, "contrast": contrast, "brightness": brightness, "pixelate": pixelate, "jpeg": jpeg,
}
if tuple(CORRUPTIONS) != CORRUPTION_NAMES:  # the recipe schema validates names against config.CORRUPTION_NAMES
    raise ImportError(f"config.CORRUPTION_NAMES {CORRUPTION_NAMES} and eval.corruptions {tuple(CORRUPTIONS)} differ")


def parse_corruptions(names: str | list[str]) -> list[str]:
    """'all' or a comma-separated list (or a list) of CORRUPTIONS keys -> the names, validated."""
    items = names.split(",") if isinstance(names, str) else list(names)
    items = [n.strip() for n in items if n.strip()]
    if items == ["all"]:
        return list(CORRUPTIONS)
    unknown = [n for n in items if n not in CORRUPTIONS]
    if unknown or not items:
        raise DataError(f"unknown corruption(s) {unknown or items!r}; known: all, {', '.join(CORRUPTIONS)}")
    return items


def corrupt(images: Tensor, name: str, severity: int, seed: int = 0, chunk: int = 2048) -> Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, H, W): `name` at `severity` (1–5), in chunks to bound memory."""
    if name not in CORRUPTIONS:
        raise DataError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise DataError(f"corruption severity must be one of {SEVERITIES}, got {severity!r}")
    out = torch.empty_like(images)
    for start in range(0, images.shape[0], chunk):
        part = images[start:start + chunk].float() / 255.0
        result = CORRUPTIONS[name](part, severity, seed + start)
        out[start:start + chunk] = (result.clamp(0, 1) * 255).round().to(torch.uint8)
    return out
