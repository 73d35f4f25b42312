"""From a stage's `data` config to tensors ready for training: load, convert, split, normalisation stats."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import DataConfig
from ..errors import DataError
from .imageset import ImageSet
from .specs import load_splits, parse_spec
from .splits import labeled_indices, unlabeled_indices


@dataclass
class DataInfo:
    """What a backbone was trained on: recorded in backbone.pt so evaluation can convert other data to match."""

    num_classes: int
    classes: list[str]
    channels: int
    image_size: int
    mean: list[float]
    std: list[float]
    dataset: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict) -> "DataInfo":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


@dataclass
class PreparedData:
    train: ImageSet
    test: ImageSet
    labeled: torch.Tensor  # int64 (L,) indices into train
    unlabeled: Optional[torch.Tensor]  # int64 (U,) indices into train, None when the stage uses no unlabeled data
    info: DataInfo


def channel_stats(images: torch.Tensor, chunk: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images in [0, 1] units."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    count = 0
    for start in range(0, images.shape[0], chunk):
        part = images[start:start + chunk].double() / 255.0
        total += part.sum(dim=(0, 2, 3))
        total_sq += (part ** 2).sum(dim=(0, 2, 3))
        count += part.shape[0] * part.shape[2] * part.shape[3]
    mean = total / count
    std = (total_sq / count - mean ** 2).clamp_min(1e-12).sqrt()
    return [round(float(v), 6) for v in mean], [round(max(float(v), 1e-3), 6) for v in std]


def load_converted(spec: str, image_size: int, channels: Optional[int]) -> dict[str, ImageSet]:
    """Every split of `spec`, resized to image_size and converted to `channels` (native channels when None)."""
    splits = load_splits(spec, folder_size=image_size)
    target_channels = channels or splits["train"].channels
    return {name: split.converted(image_size, target_channels) for name, split in splits.items()}


def _append(train: ImageSet, extra: ImageSet) -> tuple[ImageSet, torch.Tensor]:
    """train + extra images as one ImageSet -> (joined, indices (M,) of the extra images in it)."""
    offset = len(train)
    joined = ImageSet(torch.cat([train.images, extra.images]), torch.cat([train.labels, extra.labels]),
                      train.classes, train.name)
    return joined, torch.arange(offset, len(joined))


def _append_unlabeled_domain(train: ImageSet, spec: str, image_size: int) -> tuple[ImageSet, torch.Tensor]:
    """Another domain's training images as the unlabeled pool (domain adaptation). Its labels stay hidden from
    training and serve only to measure pseudo-label accuracy, so its classes must be the labeled set's."""
    other = load_converted(spec, image_size, train.channels)
    if other["train"].classes != train.classes:
        raise DataError(f"data.unlabeled_dataset {spec!r} has classes {other['train'].classes[:10]}, the labeled "
                        f"dataset {train.name!r} has {train.classes[:10]}: adaptation needs the same classes")
    return _append(train, other["train"])


def prepare_data(cfg: DataConfig, seed: int, use_unlabeled: bool) -> PreparedData:
    """Load and split a stage's data. Labeled: labels_per_class per class (all when None)."""
    spec = cfg.spec()
    parse_spec(spec)
    splits = load_converted(spec, cfg.image_size, cfg.channels)
    train = splits["train"]
    test = load_converted(cfg.test, cfg.image_size, train.channels)["test"] if cfg.test else splits["test"]
    if test.classes != train.classes:
        raise DataError(f"test set {cfg.test!r} has classes {test.classes[:10]}, training set {train.classes[:10]}")
    if cfg.labels_per_class is None:
        labeled = (train.labels >= 0).nonzero().squeeze(1)
    else:
        labeled = labeled_indices(train.labels, cfg.labels_per_class, cfg.split_seed if cfg.split_seed is not None
                                  else seed, train.classes)
    unlabeled = None
    if use_unlabeled and cfg.unlabeled_dataset:
        train, unlabeled = _append_unlabeled_domain(train, cfg.unlabeled_dataset, cfg.image_size)
    elif use_unlabeled:
        unlabeled = unlabeled_indices(len(train), labeled, cfg.include_labeled_in_unlabeled)
        if "unlabeled" in splits:  # e.g. STL-10's 100k unlabeled images
            train, extra_index = _append(train, splits["unlabeled"])
            unlabeled = torch.cat([unlabeled, extra_index])
    if cfg.normalize == "dataset":
        mean, std = channel_stats(train.images)
    else:
        mean, std = [0.0] * train.channels, [1.0] * train.channels
    info = DataInfo(train.num_classes, list(train.classes), train.channels, cfg.image_size, mean, std, spec)
    return PreparedData(train, test, labeled, unlabeled, info)
