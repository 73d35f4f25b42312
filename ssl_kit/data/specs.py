"""Dataset spec strings: `NAME`, `NAME:ROOT` or `NAME:ARG`, plus `,key=value` options; NAME is a registered
dataset kind (kinds.py; every kind is registered in catalog.py). Parsing checks the argument and
the options against what the kind declares; loading asks the kind, and a file-indexed kind loads into memory
through its index with the one holdout policy (holdout.py), as training does.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import DataError
from .holdout import split_positions
from .imageset import ImageSet
from .inspect import load_in_memory
from .kinds import dataset_kind
from .sources import FileIndex, apply_labels_csv, build_index

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


def _check_angle(spec: str, arg: Optional[str]) -> None:
    if arg is None:
        raise DataError(f"dataset spec {spec!r}: give the angle in degrees, e.g. 'digits-rotated:45'")
    try:
        angle = float(arg)
    except ValueError:
        raise DataError(f"dataset spec {spec!r}: angle {arg!r} is not a number") from None
    if not (math.isfinite(angle) and ANGLE_RANGE[0] <= angle <= ANGLE_RANGE[1]):
        raise DataError(f"dataset spec {spec!r}: angle {arg} must be finite and within "
                        f"[{ANGLE_RANGE[0]:g}, {ANGLE_RANGE[1]:g}] degrees")


def parse_spec(spec: str) -> DatasetSpec:
    """'cifar10:/data,download=true' -> DatasetSpec('cifar10', '/data', (('download', True),))."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"dataset spec must be a non-empty string like 'digits' or 'cifar10:/data', got {spec!r}")
    head, *option_items = spec.strip().split(",")
    name, _, arg = head.partition(":")
    name = name.strip().lower()
    kind = dataset_kind(name, spec)
    arg = arg.strip() or None
    if kind.argument == "root" and arg is None:
        raise DataError(f"dataset spec {spec!r}: {name} needs a root folder, e.g. '{name}:/path/to/{name}'")
    if kind.argument == "angle":
        _check_angle(spec, arg)
    if kind.argument == "none" and arg is not None:
        raise DataError(f"dataset spec {spec!r}: {name} is builtin and takes no root or argument")
    options = tuple(_parse_option(spec, item) for item in option_items if item.strip())
    for key, _ in options:
        if key not in kind.accepted_options():
            raise DataError(f"dataset spec {spec!r}: {key}= is not an option of {name} (its options: "
                            f"{', '.join(kind.accepted_options())})")
    return DatasetSpec(name, arg, options)


@functools.lru_cache(maxsize=16)
def _load_cached(spec: DatasetSpec, folder_size: int) -> dict[str, ImageSet]:
    kind = dataset_kind(spec.name)
    if spec.option("download", False):  # only on explicit request: torchvision fetches the files into the root
        kind.download(Path(spec.arg))
    if kind.streams:
        return _indexed_splits(spec, folder_size)
    return kind.load(spec, folder_size)


def _indexed_splits(spec: DatasetSpec, size: int) -> dict[str, ImageSet]:
    """{'train', 'test'} of a file-indexed source decoded in memory (squashed to size), split as training splits
    it (holdout.split_positions); with a labels CSV (`labels=`), its labeled images only."""
    index = open_index(spec)
    train, test = split_positions(index, spec.option("test_fraction", 0.2), spec.option("seed", 0))
    if spec.option("labels"):
        train = train[index.labels[train] >= 0]
    return {split: load_in_memory(index, positions, size, f"{index.source}/{split}")[0]
            for split, positions in (("train", train), ("test", test))}


def open_index(spec: DatasetSpec, labels_csv: Optional[str] = None, workers: int = 8) -> FileIndex:
    """The file index of a streamed spec, with the labels CSV (`labels_csv`, else the spec's `labels=` option)
    applied."""
    index = build_index(spec.name, spec.arg, workers=workers)
    csv_path = labels_csv or spec.option("labels")
    return apply_labels_csv(index, csv_path) if csv_path else index


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
