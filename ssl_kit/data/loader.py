"""On-device batching: the whole dataset sits on the training device as one uint8 tensor, batches are index
gathers. Order is a pure function of (seed, stream, position), so resuming mid-epoch needs only the step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..errors import DataError


@dataclass
class Batch:
    """x: uint8 (B, C, H, W) labeled images, y: int64 (B,); u: uint8 (μB, C, H, W) unlabeled, u_y: their hidden
    labels (-1 unknown), used only for diagnostics."""

    x: Tensor
    y: Tensor
    u: Optional[Tensor] = None
    u_y: Optional[Tensor] = None
    u_index: Optional[Tensor] = None  # int64 (μB,) positions in the unlabeled set (per-sample threshold state)
    x_index: Optional[Tensor] = None  # int64 (B,) indices of the labeled images in the training set
    u_image_index: Optional[Tensor] = None  # int64 (μB,) indices of the unlabeled images in the training set
    views: Optional[list[Tensor]] = None  # streamed: uint8 (B, C, S_v, S_v) per view, cut in workers; x = views[0]
    u_views: Optional[list[Tensor]] = None  # streamed: the unlabeled views (e.g. FixMatch weak, strong); u = u_views[0]
    views_augmented: bool = False  # streamed: the workers already ran each view's photometric augmentation


class IndexStream:
    """An endless sequence of indices into n items: seeded permutations laid end to end."""

    def __init__(self, n: int, seed: int, stream: int) -> None:
        if n <= 0:
            raise DataError("cannot draw batches from an empty set of images")
        self.n, self.seed, self.stream = n, seed, stream
        self._perms: dict[int, Tensor] = {}

    def _perm(self, cycle: int) -> Tensor:
        if cycle not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.stream * 7919 + cycle)
            self._perms[cycle] = torch.randperm(self.n, generator=generator)
        return self._perms[cycle]

    def take(self, start: int, count: int) -> Tensor:
        """Indices at positions start .. start+count-1 of the stream. -> int64 (count,)."""
        positions = torch.arange(start, start + count)
        cycles = positions // self.n
        out = torch.empty(count, dtype=torch.long)
        for cycle in torch.unique(cycles).tolist():
            sel = cycles == cycle
            out[sel] = self._perm(cycle)[positions[sel] % self.n]
        return out


class DeviceLoader:
    """Global batches of `batch_size` labeled (+ `mu`·batch_size unlabeled) images; each rank gets its slice.

    images: uint8 (N, C, H, W) on the device; labeled / unlabeled: index tensors into them.
    An epoch is one pass over the main stream (unlabeled when present, else labeled), dropping the remainder.
    """

    def __init__(self, images: Tensor, labels: Tensor, labeled: Tensor, batch_size: int, seed: int,
                 unlabeled: Optional[Tensor] = None, mu: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise DataError(f"batch_size {batch_size} is not divisible by the world size {world_size}")
        self.images, self.labels = images, labels
        self.labeled, self.unlabeled = labeled.to(images.device), None if unlabeled is None else unlabeled.to(images.device)
        self.batch_size, self.mu, self.rank, self.world_size = batch_size, mu, rank, world_size
        self.labeled_stream = IndexStream(len(labeled), seed, 0)
        self.unlabeled_stream = IndexStream(len(unlabeled), seed, 1) if unlabeled is not None and mu > 0 else None
        main = len(unlabeled) // (mu * batch_size) if self.unlabeled_stream else len(labeled) // batch_size
        self.steps_per_epoch = max(1, main)

    def _rank_slice(self, index: Tensor) -> Tensor:
        per_rank = index.shape[0] // self.world_size
        return index[self.rank * per_rank:(self.rank + 1) * per_rank]

    def batch(self, step: int, micro: int = 0, micro_count: int = 1) -> Batch:
        """Micro-batch `micro` of `micro_count` of global step `step`, this rank's share."""
        size = self.batch_size // micro_count
        start = step * self.batch_size + micro * size
        index = self._rank_slice(self.labeled_stream.take(start, size)).to(self.images.device)
        index = self.labeled[index]
        batch = Batch(self.images[index], self.labels[index], x_index=index)
        if self.unlabeled_stream is not None:
            u_size = self.mu * size
            position = self._rank_slice(self.unlabeled_stream.take(self.mu * start, u_size)).to(self.images.device)
            image_index = self.unlabeled[position]
            batch.u, batch.u_y, batch.u_index = self.images[image_index], self.labels[image_index], position
            batch.u_image_index = image_index
        return batch

    def close(self) -> None:
        """Nothing to stop: the images are already on the device (the stream loader's close stops its workers)."""


def iterate_in_chunks(images: Tensor, chunk: int):
    """Yield consecutive slices of at most `chunk` rows."""
    for start in range(0, images.shape[0], chunk):
        yield images[start:start + chunk]
