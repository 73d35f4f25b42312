"""`ImageSet`: a whole dataset held as one uint8 tensor, the unit every loader returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError


@dataclass
class ImageSet:
    """images: uint8 (N, C, H, W); labels: int64 (N,), -1 where unknown; classes: names, index = label."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(f"{self.name}: images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.name}: {self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")
        known = self.labels[self.labels >= 0]
        if known.numel() and int(known.max()) >= len(self.classes):
            raise DataError(
                f"{self.name}: label {int(known.max())} is out of range for {len(self.classes)} classes {self.classes[:10]}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, index: torch.Tensor | np.ndarray, name: str | None = None) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index], self.classes, name or self.name)

    def converted(self, size: int, channels: int) -> "ImageSet":
        """Resize to size×size (bilinear, antialiased) and convert to `channels` (1 or 3)."""
        return ImageSet(convert_images(self.images, size, channels), self.labels, self.classes, self.name)


def convert_images(images: torch.Tensor, size: int, channels: int, chunk: int = 4096) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, channels, size, size). RGB(A)->gray by ITU-R 601 luma, gray->RGB by copy."""
    if images.shape[1] == 4:
        images = images[:, :3]
    out = []
    for start in range(0, images.shape[0], chunk):
        part = images[start:start + chunk]
        if part.shape[1] == 3 and channels == 1:
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            part = (part.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        elif part.shape[1] == 1 and channels == 3:
            part = part.expand(-1, 3, -1, -1)
        elif part.shape[1] != channels:
            raise DataError(f"cannot convert images with {part.shape[1]} channels to {channels}")
        if part.shape[-2:] != (size, size):
            resized = F.interpolate(part.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            part = resized.round().clamp(0, 255).to(torch.uint8)
        out.append(part.contiguous())
    if not out:
        return torch.empty((0, channels, size, size), dtype=torch.uint8)
    return torch.cat(out)
