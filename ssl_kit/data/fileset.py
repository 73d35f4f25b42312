"""`FileSet`: a split of a streamed source held as positions into its `FileIndex`, nothing decoded; and
`image_batches`, evaluation batches of either an in-memory `ImageSet` or a `FileSet`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .imageset import ImageSet, convert_images
from .sources import FileIndex
from .stream import BadImageLog, eval_batches


@dataclass
class FileSet:
    """The `ImageSet` interface without images: `positions` int64 (N,) into `index`; labels int64 (N,) (-1
    unknown) and classes come from the index. Memory: the index (shared) plus 8 bytes per image."""

    index: FileIndex
    positions: np.ndarray
    name: str = ""
    channels: int = 3

    def __post_init__(self) -> None:
        self.positions = np.asarray(self.positions, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    @property
    def labels(self) -> Tensor:
        return torch.from_numpy(self.index.labels[self.positions])

    @property
    def classes(self) -> list[str]:
        return self.index.classes

    @property
    def num_classes(self) -> int:
        return len(self.index.classes)

    def subset(self, rows, name: Optional[str] = None) -> "FileSet":
        rows = np.asarray(rows.cpu() if torch.is_tensor(rows) else rows, dtype=np.int64)
        return FileSet(self.index, self.positions[rows], name or self.name, self.channels)


Images = Union[ImageSet, FileSet]


def image_batches(images: Images, size: int, channels: int, batch_size: int = 256, workers: int = 2,
                  resize_ratio: float = 0.875, bad: Optional[BadImageLog] = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Evaluation batches in order -> (uint8 (B, channels, size, size), labels int64 (B,)).

    ImageSet: converted to size/channels as `convert_images` does. FileSet: decoded by `workers` DataLoader workers
    with the evaluation transform (shorter side -> size/resize_ratio, centre crop); unreadable files are left out
    (recorded in `bad` when given), so the labels always match the images yielded."""
    if isinstance(images, ImageSet):
        for start in range(0, len(images), batch_size):
            chunk = images.images[start:start + batch_size]
            yield convert_images(chunk, size, channels), images.labels[start:start + batch_size]
        return
    for x, y, _ in eval_batches(images.index, images.positions, size, channels, resize_ratio, batch_size, workers,
                                bad):
        yield x, y
