"""Crop boxes for streamed views, as pure functions of (seed, position, view).

A streamed image is decoded once per step and every view is cut from its original geometry. The box of each view
follows torchvision's `RandomResizedCrop.get_params` rule (10 tries of an area fraction in `scale` and a
log-uniform aspect ratio in `ratio`, then a centre crop clamped to the ratio range), but its random numbers come
from a generator seeded by (seed, global position in the stream, view index) alone. So the boxes do not depend
on the number of DataLoader workers, on the process, or on what was drawn before: resuming at any step gives the
same crops without replaying the stream.

Horizontal flips happen in the worker too (`CropSpec.flip`): one bit per (seed, position, view), so the device
augmentation of a streamed view must not crop or flip again.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from ..errors import DataError

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class CropSpec:
    """One kind of view: `count` crops of size×size pixels with area fraction in `scale` and aspect (w/h) in
    `ratio`, flipped horizontally with probability 1/2 when `flip`. DINO: [CropSpec(224, (0.4, 1), count=2),
    CropSpec(96, (0.05, 0.4), count=6)]."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    count: int = 1
    flip: bool = False

    def __post_init__(self) -> None:
        if int(self.size) != self.size or self.size < 1:
            raise DataError(f"CropSpec: size must be a positive integer, got {self.size!r}")
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise DataError(f"CropSpec: scale must satisfy 0 < low <= high <= 1, got {tuple(self.scale)}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise DataError(f"CropSpec: ratio must satisfy 0 < low <= high, got {tuple(self.ratio)}")
        if int(self.count) != self.count or self.count < 1:
            raise DataError(f"CropSpec: count must be a positive integer, got {self.count!r}")


def expand_views(specs: list[CropSpec] | tuple[CropSpec, ...]) -> list[CropSpec]:
    """[CropSpec(224, count=2), CropSpec(96, count=6)] -> 8 entries, one per view, in order."""
    if not specs:
        raise DataError("at least one CropSpec is needed to cut views")
    return [spec for spec in specs for _ in range(spec.count)]


def view_rng(seed: int, position: int, view: int) -> random.Random:
    """A generator that depends only on (seed, position, view): distinct triples give distinct seeds."""
    key = ((int(seed) & _MASK64) << 96) | ((int(position) & _MASK64) << 32) | (int(view) & 0xFFFFFFFF)
    return random.Random(key)


def crop_box(height: int, width: int, spec: CropSpec, seed: int, position: int, view: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of view `view` of the image at stream position `position`, in the original image's
    pixel grid; always inside the (height, width) image."""
    if height < 1 or width < 1:
        raise DataError(f"crop_box: image of size {height}×{width} has no pixels")
    rng = view_rng(seed, position, view)
    area = height * width
    log_low, log_high = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(spec.scale[0], spec.scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < spec.ratio[0]:
        w, h = width, max(1, min(height, int(round(width / spec.ratio[0]))))
    elif in_ratio > spec.ratio[1]:
        h, w = height, max(1, min(width, int(round(height * spec.ratio[1]))))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def flip_bit(seed: int, position: int, view: int) -> bool:
    """The horizontal flip of a view: a fair coin that depends only on (seed, position, view)."""
    return view_rng(seed ^ 0x5F1B, position, view).random() < 0.5


def center_box(height: int, width: int, size: int, resize_ratio: float = 0.875) -> tuple[int, int, int, int]:
    """Evaluation crop: the box that 'resize the shorter side to size/resize_ratio, centre-crop size×size' cuts,
    expressed in the original grid -> (top, left, h, w) with h == w."""
    if not 0 < resize_ratio <= 1:
        raise DataError(f"eval resize ratio must be in (0, 1], got {resize_ratio}")
    shorter = min(height, width)
    side = max(1, min(shorter, int(round(shorter * resize_ratio))))
    return (height - side) // 2, (width - side) // 2, side, side
