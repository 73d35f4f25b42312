"""Dataset spec strings: `NAME`, `NAME:ROOT` or `NAME:ARG`, plus `,key=value` options.

    digits                      scikit-learn digits (builtin)
    digits-printed[,per_font=N] digits rendered from fonts (builtin)
    digits-rotated:ANGLE        digits rotated by ANGLE degrees (builtin)
    fashion-mnist[:ROOT]        IDX files (default root /usr/share/datasets/fashion-mnist)
    mnist:ROOT  cifar10:ROOT  cifar100:ROOT  svhn:ROOT  stl10:ROOT  imagefolder:ROOT
    images:ROOT  filelist:FILE  webdataset:PATTERN   streamed sources (see sources.py)
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torchvision.datasets as tvd

from ..errors import DataError
from . import builtin, formats
from .builtin import stratified_holdout
from .imageset import ImageSet
from .holdout import split_positions
from .inspect import load_in_memory, streamed_splits
from .sources import FileIndex, apply_labels_csv, build_index

FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
NEEDS_ROOT = ("mnist", "cifar10", "cifar100", "svhn", "stl10", "imagefolder", "images", "filelist", "webdataset")
KNOWN = ("digits", "digits-printed", "digits-rotated", "fashion-mnist") + NEEDS_ROOT
OPTIONS = {"download": bool, "per_font": int, "test_fraction": float, "seed": int, "labels": str, "storage": str}
OPTION_RANGES = {"per_font": (1, 1000), "test_fraction": (0.01, 0.99), "seed": (0, 2**63 - 1)}  # inclusive
STORAGES = ("auto", "memory", "stream")
ANGLE_RANGE = (-360.0, 360.0)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    arg: str | None = None
    options: tuple[tuple[str, object], ...] = field(default_factory=tuple)

    def option(self, key: str, default=None):
        return dict(self.options).get(key, default)

    def __str__(self) -> str:
        text = self.name + (f":{self.arg}" if self.arg is not None else "")
        return text + "".join(f",{k}={v}" for k, v in self.options)


def _parse_option(spec: str, item: str) -> tuple[str, object]:
    if "=" not in item:
        raise DataError(f"dataset spec {spec!r}: option {item!r} is not key=value (known keys: {sorted(OPTIONS)})")
    key, value = (part.strip() for part in item.split("=", 1))
    if key not in OPTIONS:
        raise DataError(f"dataset spec {spec!r}: unknown option {key!r} (known: {sorted(OPTIONS)})")
    kind = OPTIONS[key]
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return key, value.lower() in ("true", "1", "yes")
        if key == "storage" and value not in STORAGES:
            raise ValueError(value)
        parsed = kind(value)
    except (ValueError, OverflowError):
        expected = " or ".join(STORAGES) if key == "storage" else f"a valid {kind.__name__}"
        raise DataError(f"dataset spec {spec!r}: option {key}={value!r} is not {expected}") from None
    if key not in OPTION_RANGES:
        return key, parsed
    low, high = OPTION_RANGES[key]
    if not math.isfinite(parsed) or not low <= parsed <= high:
        raise DataError(f"dataset spec {spec!r}: option {key}={value} is outside [{low:g}, {high:g}]")
    return key, parsed


def parse_spec(spec: str) -> DatasetSpec:
    """'cifar10:/data,download=true' -> DatasetSpec('cifar10', '/data', (('download', True),))."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"dataset spec must be a non-empty string like 'digits' or 'cifar10:/data', got {spec!r}")
    head, *option_items = spec.strip().split(",")
    name, _, arg = head.partition(":")
    name = name.strip().lower()
    if name not in KNOWN:
        raise DataError(f"unknown dataset {name!r} in spec {spec!r} (known: {', '.join(KNOWN)})")
    arg = arg.strip() or None
    if name in NEEDS_ROOT and arg is None:
        raise DataError(f"dataset spec {spec!r}: {name} needs a root folder, e.g. '{name}:/path/to/{name}'")
    if name == "digits-rotated":
        if arg is None:
            raise DataError(f"dataset spec {spec!r}: give the angle in degrees, e.g. 'digits-rotated:45'")
        try:
            angle = float(arg)
        except ValueError:
            raise DataError(f"dataset spec {spec!r}: angle {arg!r} is not a number") from None
        if not (math.isfinite(angle) and ANGLE_RANGE[0] <= angle <= ANGLE_RANGE[1]):
            raise DataError(f"dataset spec {spec!r}: angle {arg} must be finite and within "
                            f"[{ANGLE_RANGE[0]:g}, {ANGLE_RANGE[1]:g}] degrees")
    if name in ("digits", "digits-printed") and arg is not None:
        raise DataError(f"dataset spec {spec!r}: {name} is builtin and takes no root or argument")
    options = tuple(_parse_option(spec, item) for item in option_items if item.strip())
    file_options = [key for key, _ in options if key in ("labels", "storage")]
    if name not in ("imagefolder", "images", "filelist", "webdataset") and file_options:
        raise DataError(f"dataset spec {spec!r}: labels= and storage= are options of imagefolder, images, filelist "
                        f"and webdataset")
    return DatasetSpec(name, arg, options)


def _download(spec: DatasetSpec) -> None:
    """Only on explicit request (download=true): fetch the files with torchvision into the root."""
    root = Path(spec.arg)
    makers = {
        "mnist": lambda: [tvd.MNIST(root.parent, train=t, download=True) for t in (True, False)],
        "cifar10": lambda: tvd.CIFAR10(root, download=True),
        "cifar100": lambda: tvd.CIFAR100(root, download=True),
        "svhn": lambda: [tvd.SVHN(root, split=s, download=True) for s in ("train", "test")],
        "stl10": lambda: tvd.STL10(root, split="train", download=True),
    }
    if spec.name not in makers:
        raise DataError(f"dataset {spec.name!r} cannot be downloaded; place the files under {str(root)!r}")
    makers[spec.name]()


@functools.lru_cache(maxsize=16)
def _load_cached(spec: DatasetSpec, folder_size: int) -> dict[str, ImageSet]:
    name, arg = spec.name, spec.arg
    if spec.option("download", False):
        _download(spec)
    if name == "digits":
        return builtin.load_digits_dataset()
    if name == "digits-printed":
        return builtin.load_printed_digits(per_font=spec.option("per_font", 20), seed=spec.option("seed", 0))
    if name == "digits-rotated":
        return builtin.load_rotated_digits(float(arg))
    if name == "fashion-mnist":
        return formats.load_idx_dataset(Path(arg or FASHION_MNIST_DEFAULT_ROOT), "fashion-mnist", formats.FASHION_CLASSES)
    if name == "mnist":
        root = Path(arg)
        if (root / "MNIST" / "raw").is_dir():
            root = root / "MNIST" / "raw"
        return formats.load_idx_dataset(root, "mnist", [str(i) for i in range(10)])
    if name == "cifar10":
        return formats.load_cifar10(Path(arg))
    if name == "cifar100":
        return formats.load_cifar100(Path(arg))
    if name == "svhn":
        return formats.load_svhn(Path(arg))
    if name == "stl10":
        return formats.load_stl10(Path(arg))
    if spec.option("labels"):  # a labels CSV over a streamed source: its labeled images, the test held out
        index = open_index(spec)
        positions = split_positions(index, spec.option("test_fraction", 0.2), spec.option("seed", 0))
        return {split: load_in_memory(index, pos[index.labels[pos] >= 0], folder_size, f"{index.source}/{split}")[0]
                for split, pos in zip(("train", "test"), positions)}
    if name in ("images", "filelist", "webdataset"):
        return streamed_splits(build_index(name, arg), folder_size, None, spec.option("test_fraction", 0.2),
                               spec.option("seed", 0))
    return _load_image_folder_splits(spec, folder_size)


def open_index(spec: DatasetSpec, labels_csv: Optional[str] = None, workers: int = 8) -> FileIndex:
    """The file index of a streamed spec, with the labels CSV (`labels_csv`, else the spec's `labels=` option)
    applied."""
    index = build_index(spec.name, spec.arg, workers=workers)
    csv_path = labels_csv or spec.option("labels")
    return apply_labels_csv(index, csv_path) if csv_path else index


def _load_image_folder_splits(spec: DatasetSpec, size: int) -> dict[str, ImageSet]:
    """root/train/<class> and root/test/<class> when present; else one folder split 80/20 by seed."""
    root = Path(spec.arg)
    if (root / "train").is_dir() and (root / "test").is_dir():
        train = formats.load_image_folder(root / "train", size, f"imagefolder:{root}/train")
        test = formats.load_image_folder(root / "test", size, f"imagefolder:{root}/test")
        if train.classes != test.classes:
            raise DataError(f"imagefolder {str(root)!r}: train classes {train.classes} differ from test {test.classes}")
        return {"train": train, "test": test}
    full = formats.load_image_folder(root, size, f"imagefolder:{root}")
    train_index, test_index = stratified_holdout(full.labels.numpy(), spec.option("test_fraction", 0.2),
                                                 spec.option("seed", 0))
    return {"train": full.subset(train_index, f"{full.name}/train"), "test": full.subset(test_index, f"{full.name}/test")}


def load_splits(spec: str | DatasetSpec, folder_size: int = 64) -> dict[str, ImageSet]:
    """All splits of a dataset at its native size: {'train', 'test'[, 'unlabeled']}. The test split of a source
    without labels (an `images:` tree) is empty: nothing in it could be scored."""
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    splits = _load_cached(parsed, folder_size)
    unlabeled_source = not bool((splits["train"].labels >= 0).any())
    for split_name, split in splits.items():
        if len(split) == 0 and not (split_name == "test" and unlabeled_source):
            raise DataError(f"dataset {str(parsed)!r}: split {split_name!r} is empty")
    return splits
