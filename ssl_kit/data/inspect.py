"""What a streamed source holds (`ssl-kit data`), and a small source decoded into an in-memory `ImageSet`.

`summarize` reads only image headers (a sample spread over the index) for the size/aspect summary, so it runs in
seconds on a million files once the index is cached.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from ..errors import DataError
from .decode import BadImage, decode_resized, image_size
from .imageset import ImageSet
from .sources import FileIndex, choose_storage, decoded_bytes


def _quantiles(values: list[float]) -> dict:
    array = np.asarray(values, dtype=np.float64)
    return {"min": float(array.min()), "median": float(np.median(array)), "max": float(array.max())}


def header_stats(index: FileIndex, sample: int = 1000) -> dict:
    """Width/height/aspect (w/h) min/median/max over up to `sample` images evenly spread over the index."""
    picks = np.unique(np.linspace(0, len(index) - 1, num=min(sample, len(index))).round().astype(np.int64))
    widths, heights, unreadable = [], [], 0
    for i in picks.tolist():
        try:
            w, h = image_size(index.read(i), index.path(i))
            widths.append(w)
            heights.append(h)
        except (BadImage, OSError):
            unreadable += 1
    stats = {"sampled": int(len(picks)), "unreadable_in_sample": unreadable}
    if widths:
        stats.update(width=_quantiles(widths), height=_quantiles(heights),
                     aspect=_quantiles([w / h for w, h in zip(widths, heights)]))
    return stats


def summarize(index: FileIndex, image_size: int = 224, channels: int = 3, storage: str = "auto",
              budget_gb: float = 4.0, sample: int = 1000) -> dict:
    """The dry run before a long job: counts, classes, header size summary, decoded bytes at image_size and the
    storage `data.storage` would choose."""
    labeled = int((index.labels >= 0).sum())
    counts = np.bincount(index.labels[index.labels >= 0], minlength=index.num_classes) if labeled else []
    nbytes = decoded_bytes(len(index), image_size, channels)
    return {
        "source": index.source,
        "images": len(index),
        "splits": {name: int(len(pos)) for name, pos in index.splits.items()},
        "labeled": labeled,
        "unlabeled": len(index) - labeled,
        "classes": len(index.classes),
        "class_names": index.classes[:20],
        "per_class_min": int(min(counts)) if labeled else 0,
        "per_class_max": int(max(counts)) if labeled else 0,
        "skipped_at_index": len(index.skipped),
        "index_bytes": index.nbytes(),
        "image_size": image_size,
        "decoded_bytes": nbytes,
        "decoded_gib": round(nbytes / 2 ** 30, 3),
        "memory_budget_gb": budget_gb,
        "storage": choose_storage(storage, len(index), image_size, channels, budget_gb),
        **header_stats(index, sample),
    }


def load_in_memory(index: FileIndex, positions: np.ndarray, size: int, name: str,
                   channels: int = 3) -> tuple[ImageSet, list[tuple[str, str]]]:
    """The in-memory path for a small streamed source: every image squashed to size×size (as
    `formats.load_image_folder` does) -> (ImageSet of uint8 (N, channels, size, size), bad files left out as
    (path, reason)). No positions give an empty ImageSet (a test split of a source without labels)."""
    if len(positions) == 0:
        empty = torch.empty((0, channels, size, size), dtype=torch.uint8)
        return ImageSet(empty, torch.empty(0, dtype=torch.long), index.classes, name), []
    images, labels, bad = [], [], []
    for i in np.asarray(positions, dtype=np.int64).tolist():
        try:
            images.append(decode_resized(index.read(i), index.path(i), size, channels))
            labels.append(int(index.labels[i]))
        except BadImage as exc:
            bad.append((exc.name, exc.reason))
        except OSError as exc:
            bad.append((index.path(i), f"cannot read the file ({exc.strerror or exc})"))
    for path, reason in bad[:20]:
        warnings.warn(f"{name}: left out bad image {path}: {reason}")
    if not images:
        raise DataError(f"{name}: none of the {len(positions)} images could be decoded")
    return ImageSet(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long), index.classes,
                    name), bad
