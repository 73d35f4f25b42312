"""One way to open a dataset spec, for a training stage (pipeline.prepare_data) and for every evaluation command
(eval/features.py): which images are train and which are test (the one holdout policy, holdout.split_positions),
whether the set is decoded into memory or streamed from its files (data.storage, else the spec's `storage=` option,
else `auto`: streamed when the decoded set exceeds data.memory_budget_gb), and the splits themselves at the size and
channels asked for: `FileSet`s when streamed, decoded `ImageSet`s otherwise.

Training and evaluation decode a file-indexed source the same way (`inspect.load_in_memory` at the backbone's size
and channels), so a backbone is scored on images prepared exactly as the ones it was trained on. Builtin and
torchvision-format kinds (digits, cifar10, ...) have their own splits and are always in memory."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import DataError
from .fileset import FileSet, Images
from .holdout import split_positions
from .imageset import ImageSet
from .inspect import load_in_memory
from .kinds import dataset_kind
from .sources import FileIndex, choose_storage
from .specs import DatasetSpec, load_splits, open_index, parse_spec

DEFAULT_CHANNELS = 3  # a file-indexed source without a channels setting is decoded as RGB


def load_converted(spec: str | DatasetSpec, image_size: int, channels: Optional[int]) -> dict[str, ImageSet]:
    """Every split of a builtin / torchvision-format `spec`, resized to image_size and converted to `channels`
    (native channels when None)."""
    splits = load_splits(spec, folder_size=image_size)
    target_channels = channels or splits["train"].channels
    return {name: split.converted(image_size, target_channels) for name, split in splits.items()}


def is_streamed_source(spec: str | DatasetSpec) -> bool:
    """A file-indexed kind (imagefolder, images, filelist, webdataset, ...: see kinds.py) that can stream."""
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    return dataset_kind(parsed.name).streams


@dataclass(frozen=True)
class OpenedSource:
    """A dataset spec opened at one image size and channel count. `index` and the train/test positions (int64
    (N,), (M,) into it) are set for file-indexed kinds; `storage` is 'memory' or 'stream'."""

    spec: DatasetSpec
    image_size: int
    channels: Optional[int]
    storage: str = "memory"
    index: Optional[FileIndex] = None
    train_positions: Optional[np.ndarray] = None
    test_positions: Optional[np.ndarray] = None

    @property
    def streams(self) -> bool:
        return self.storage == "stream"

    def positions(self, split: str, labeled_only: bool = False) -> np.ndarray:
        """Positions (N,) of the 'train' or 'test' split in the file index (its labeled images only when asked)."""
        if self.index is None:
            raise DataError(f"dataset {str(self.spec)!r} is not file-indexed: it has no file positions")
        positions = self.train_positions if split == "train" else self.test_positions
        return positions[self.index.labels[positions] >= 0] if labeled_only else positions

    def split(self, split: str, labeled_only: bool = False) -> Images:
        """The 'train' or 'test' split of a file-indexed source: a FileSet (nothing decoded) when streamed, else an
        ImageSet of uint8 (N, channels, image_size, image_size) decoded as training decodes it."""
        positions = self.positions(split, labeled_only)
        name, channels = f"{self.index.source}/{split}", self.channels or DEFAULT_CHANNELS
        if self.streams:
            return FileSet(self.index, positions, name, channels)
        return load_in_memory(self.index, positions, self.image_size, name, channels)[0]

    def splits(self, labeled_only: bool = False) -> dict[str, Images]:
        """{'train', 'test'[, 'unlabeled']}: the file-indexed splits (see `split`), or a builtin kind's own splits
        converted to image_size and channels."""
        if self.index is None:
            return load_converted(self.spec, self.image_size, self.channels)
        return {name: self.split(name, labeled_only) for name in ("train", "test")}


def open_source(spec: str | DatasetSpec, image_size: int, channels: Optional[int], memory_budget_gb: float,
                storage: str = "auto", labels_csv: Optional[str] = None, workers: int = 2) -> OpenedSource:
    """Open `spec` for a stage or an evaluation at `image_size` and `channels` (None: a builtin kind's native
    channels, RGB for files). `storage` auto|memory|stream (auto defers to the spec's `storage=` option, then to
    `memory_budget_gb`); `labels_csv`: a CSV of path,label rows labelling files of a file-indexed source."""
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    if not dataset_kind(parsed.name).streams:
        if labels_csv:
            raise DataError(f"data.labels {labels_csv!r}: a labels CSV names files of an image folder, file list or "
                            f"images: tree; {parsed.name!r} has its own labels")
        return OpenedSource(parsed, image_size, channels)
    index = open_index(parsed, labels_csv, workers=workers)
    train, test = split_positions(index, parsed.option("test_fraction", 0.2), parsed.option("seed", 0))
    requested = storage if storage != "auto" else parsed.option("storage", "auto")
    chosen = choose_storage(requested, len(train) + len(test), image_size, channels or DEFAULT_CHANNELS,
                            memory_budget_gb)
    return OpenedSource(parsed, image_size, channels, chosen, index, train, test)
