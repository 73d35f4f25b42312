"""From a stage's `data` config to tensors ready for training: load, convert, split, normalisation stats."""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError
from .fileset import FileSet, Images, image_batches
from .imageset import ImageSet
from .opened import DEFAULT_CHANNELS, is_streamed_source, load_converted, open_source
from .needs import DataNeeds
from .sources import check_appended_classes, join_indexes
from .specs import DatasetSpec, open_index, parse_spec
from .splits import labeled_indices, largest_head, long_tail_counts, long_tailed_indices, unlabeled_indices

NORM_SAMPLE = 512  # images decoded for the normalisation statistics of a streamed set


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
    eval_resize_ratio: float = DataConfig.model_fields["eval_resize_ratio"].default  # evaluation transform

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PreparedData:
    """train/test: in-memory `ImageSet`s, or `FileSet`s (positions into a file index, nothing decoded) when the
    stage streams. labeled/unlabeled index rows of `train` in both cases."""

    train: Images
    test: Images
    labeled: torch.Tensor  # int64 (L,) indices into train
    unlabeled: Optional[torch.Tensor]  # int64 (U,) indices into train, None when the stage uses no unlabeled data
    info: DataInfo

    @property
    def streamed(self) -> bool:
        return isinstance(self.train, FileSet)

    def images_in_memory(self) -> Optional[torch.Tensor]:
        """The decoded training images, uint8 (N, C, H, W), or None when the stage streams them from files."""
        return None if self.streamed else self.train.images

    def spread_rows(self, rows: torch.Tensor, limit: int) -> torch.Tensor:
        """`rows` (R,) of train to decode and score once (e.g. a pseudo-label sweep): all of them in memory; at most
        `limit` evenly spread over them when streamed (each is decoded from its file), so no class or folder
        dominates. -> (min(R, limit),) or (R,)."""
        if not self.streamed or len(rows) <= limit:
            return rows
        return rows[torch.linspace(0, len(rows) - 1, limit).round().long()]


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


def _append(train: ImageSet, extra: ImageSet) -> tuple[ImageSet, torch.Tensor]:
    """train + extra images as one ImageSet -> (joined, indices (M,) of the extra images in it)."""
    offset = len(train)
    joined = ImageSet(torch.cat([train.images, extra.images]), torch.cat([train.labels, extra.labels]),
                      train.classes, train.name)
    return joined, torch.arange(offset, len(joined))


@contextmanager
def _naming_unlabeled_dataset(spec: str) -> Iterator[None]:
    """A DataError raised inside starts with the key and value it is about: data.unlabeled_dataset 'SPEC': ..."""
    try:
        yield
    except DataError as exc:
        raise DataError(f"data.unlabeled_dataset {spec!r}: {exc}") from None


def _append_unlabeled_domain(train: ImageSet, spec: str, image_size: int) -> tuple[ImageSet, torch.Tensor]:
    """Another domain's training images as the unlabeled pool (domain adaptation). Its labels stay hidden from
    training and serve only to measure pseudo-label accuracy, so its classes must be the labeled set's, or it has
    none (an unlabeled `images:` tree or file list)."""
    other = load_converted(spec, image_size, train.channels)["train"]
    with _naming_unlabeled_dataset(spec):
        check_appended_classes(other.name or spec, other.classes, train.name or "the labeled dataset", train.classes)
    return _append(train, other)


def _append_streamed_domain(train: FileSet, cfg: DataConfig) -> tuple[FileSet, torch.Tensor]:
    """A streamed training set + the training images of data.unlabeled_dataset (a streamed source) as the unlabeled
    pool, joined into one file index (join_indexes) -> (joined FileSet, its rows of the appended images)."""
    spec = parse_spec(cfg.unlabeled_dataset)
    if not is_streamed_source(spec):
        raise DataError(f"data.unlabeled_dataset {cfg.unlabeled_dataset!r}: a streamed labeled set takes a streamed "
                        f"unlabeled set (imagefolder:, images:, filelist:, webdataset:); or set data.storage=memory")
    other = open_index(spec, workers=max(2, cfg.workers))
    with _naming_unlabeled_dataset(cfg.unlabeled_dataset):
        joined = join_indexes(train.index, other)
    appended = other.split("train") + len(train.index)
    positions = np.concatenate([train.positions, appended])
    rows = torch.arange(len(train), len(positions))
    return FileSet(joined, positions, train.name, train.channels), rows


def sample_stats(train: FileSet, size: int, resize_ratio: float, workers: int,
                 sample: int = NORM_SAMPLE) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of up to `sample` training images evenly spread over the set (evaluation crop at
    `size`): bounded work and memory whatever the set's size."""
    rows = np.unique(np.linspace(0, len(train) - 1, num=min(sample, len(train))).round().astype(np.int64))
    chunks = [x for x, _ in image_batches(train.subset(rows), size, train.channels, 128, workers, resize_ratio)]
    if not chunks:
        raise DataError(f"{train.name}: none of the {len(rows)} sampled images could be decoded for the "
                        f"normalisation statistics")
    return channel_stats(torch.cat(chunks))


def _streamed_splits(cfg: DataConfig, spec: DatasetSpec) -> tuple[Images, Images, str]:
    """train/test of a file-indexed source (opened.open_source: FileSets when the stage streams, else decoded
    ImageSets) -> (train, test, spec string recorded in DataInfo: the labels CSV as a `labels=` option)."""
    labels_csv = os.path.abspath(cfg.labels) if cfg.labels else None
    source = open_source(spec, cfg.image_size, cfg.channels or DEFAULT_CHANNELS, cfg.memory_budget_gb, cfg.storage,
                         labels_csv, workers=max(2, cfg.workers))
    recorded = str(spec) + (f",labels={labels_csv}" if labels_csv and not spec.option("labels") else "")
    if source.streams and not spec.option("storage"):
        recorded += ",storage=stream"  # its evaluations stream too
    return source.split("train"), source.split("test"), recorded


def _test_set(cfg: DataConfig, train: Images) -> Images:
    """The set named by data.test (all its labeled images when it is a streamed source, else its test split)."""
    spec = parse_spec(cfg.test)
    if not is_streamed_source(spec):
        channels = train.channels
        return load_converted(cfg.test, cfg.image_size, channels)["test"]
    index = open_index(spec, workers=max(2, cfg.workers))
    positions = np.flatnonzero(index.labels >= 0)
    return FileSet(index, positions, f"{index.source}/test", train.channels)


def _drawn_rows(cfg: DataConfig, seed: int, needs: DataNeeds, train: Images, extra_unlabeled: Optional[ImageSet],
                spec: str) -> tuple[Images, torch.Tensor, Optional[torch.Tensor]]:
    """The rows of `train` a method with these needs draws -> (train, with another domain or an extra unlabeled
    split appended when the pool comes from there; labeled rows (L,); unlabeled rows (U,) or None)."""
    if cfg.long_tail is not None:
        return (train, *_long_tailed_rows(cfg, seed, needs, train))
    if cfg.labels_per_class is None and not needs.labels:
        labeled = torch.arange(len(train))
    elif cfg.labels_per_class is None:
        labeled = (train.labels >= 0).nonzero().squeeze(1)
    else:
        labeled = labeled_indices(train.labels, cfg.labels_per_class, cfg.split_seed if cfg.split_seed is not None
                                  else seed, train.classes)
    if needs.labels and len(labeled) == 0:
        raise DataError(f"data.dataset {spec!r} has no labeled training images, and this stage's method learns from "
                        "labels: give data.labels (a CSV of path,label rows naming some of the files), use a "
                        "class-folder source (imagefolder:ROOT), or train a label-free method (`ssl-kit methods`)")
    if not needs.unlabeled:
        return train, labeled, None
    if cfg.unlabeled_dataset:
        if isinstance(train, FileSet):
            train, unlabeled = _append_streamed_domain(train, cfg)
        else:
            train, unlabeled = _append_unlabeled_domain(train, cfg.unlabeled_dataset, cfg.image_size)
        return train, labeled, unlabeled
    unlabeled = unlabeled_indices(len(train), labeled, cfg.include_labeled_in_unlabeled)
    if extra_unlabeled is not None:  # e.g. STL-10's 100k unlabeled images
        train, extra_index = _append(train, extra_unlabeled)
        unlabeled = torch.cat([unlabeled, extra_index])
    return train, labeled, unlabeled


def _long_tailed_rows(cfg: DataConfig, seed: int, needs: DataNeeds,
                      train: Images) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """data.long_tail: a long-tailed labeled split (labels_per_class for the head class) and, for a method that
    draws one, an unlabeled pool from the other images with its own ratio and class order. -> (labeled rows (L,),
    unlabeled rows (U,) or None)."""
    tail, k = cfg.long_tail, train.num_classes
    if cfg.unlabeled_dataset:
        raise DataError("data.long_tail draws the unlabeled pool from the dataset's own images; leave out "
                        "data.unlabeled_dataset")
    split_seed = cfg.split_seed if cfg.split_seed is not None else seed
    counts = long_tail_counts(cfg.labels_per_class, tail.ratio, k)
    labeled = long_tailed_indices(train.labels, counts, split_seed, classes=train.classes)
    if not needs.unlabeled:
        return labeled, None
    reverse = tail.unlabeled_distribution == "reversed"
    shares = long_tail_counts(10 ** 6, tail.unlabeled_gamma(), k, reverse)
    head = tail.unlabeled_per_class or largest_head(train.labels, [c / max(shares) for c in shares], labeled)
    pool_counts = long_tail_counts(head, tail.unlabeled_gamma(), k, reverse)
    unlabeled = long_tailed_indices(train.labels, pool_counts, split_seed + 1, exclude=labeled,
                                    classes=train.classes, what="unlabeled")
    return labeled, unlabeled


def prepare_data(cfg: DataConfig, seed: int, needs: DataNeeds = DataNeeds()) -> PreparedData:
    """Load and split a stage's data for a method with these `needs`. Labeled: labels_per_class per class (all
    labeled images when None; every training image, labeled or not, when the method learns without labels: a
    pretext method on a partly labeled folder). Unlabeled: the pool, when the method draws one.

    File-indexed sources (imagefolder, images, filelist, webdataset) honour data.storage: `memory` decodes the set
    (squashed to image_size) as today's in-memory path, `stream` keeps only positions into the file index, `auto`
    streams when the decoded set exceeds data.memory_budget_gb. Other sources are always in memory."""
    spec = cfg.spec()
    parsed = parse_spec(spec)
    extra_unlabeled = None
    if is_streamed_source(parsed):
        train, test, spec = _streamed_splits(cfg, parsed)
    else:
        splits = open_source(parsed, cfg.image_size, cfg.channels, cfg.memory_budget_gb, cfg.storage,
                             cfg.labels).splits()
        train, test, extra_unlabeled = splits["train"], splits["test"], splits.get("unlabeled")
    if cfg.test:
        test = _test_set(cfg, train)
    if test.classes != train.classes:
        raise DataError(f"test set {cfg.test!r} has classes {test.classes[:10]}, training set {train.classes[:10]}")
    train, labeled, unlabeled = _drawn_rows(cfg, seed, needs, train, extra_unlabeled, spec)
    if cfg.normalize == "dataset":
        if isinstance(train, FileSet):
            mean, std = sample_stats(train, cfg.image_size, cfg.eval_resize_ratio, cfg.workers)
        else:
            mean, std = channel_stats(train.images)
    else:
        mean, std = [0.0] * train.channels, [1.0] * train.channels
    info = DataInfo(train.num_classes, list(train.classes), train.channels, cfg.image_size, mean, std, spec,
                    cfg.eval_resize_ratio)
    return PreparedData(train, test, labeled, unlabeled, info)
