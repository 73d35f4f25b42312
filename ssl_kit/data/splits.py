"""Labeled/unlabeled splits by labels per class: stratified, reproducible from a seed."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError


def labeled_indices(labels: torch.Tensor, labels_per_class: int, seed: int, classes: list[str] | None = None) -> torch.Tensor:
    """Pick `labels_per_class` indices of each class at random (seeded). -> sorted int64 (num_classes·k,)."""
    labels_np = labels.cpu().numpy()
    rng = np.random.default_rng(seed)
    picked = []
    for cls in np.unique(labels_np[labels_np >= 0]):
        members = np.flatnonzero(labels_np == cls)
        if len(members) < labels_per_class:
            name = classes[cls] if classes else cls
            raise DataError(
                f"labels_per_class={labels_per_class} is larger than class {name!r} has images ({len(members)})"
            )
        picked.append(rng.choice(members, size=labels_per_class, replace=False))
    return torch.from_numpy(np.sort(np.concatenate(picked))).long()


def unlabeled_indices(n: int, labeled: torch.Tensor, include_labeled: bool) -> torch.Tensor:
    """Every index (include_labeled) or every index not in `labeled`. -> int64 (M,)."""
    if include_labeled:
        return torch.arange(n)
    mask = torch.ones(n, dtype=torch.bool)
    mask[labeled] = False
    rest = mask.nonzero().squeeze(1)
    if rest.numel() == 0:
        raise DataError("no unlabeled data left: every training image is in the labeled split")
    return rest


def long_tail_counts(head: int, ratio: float, num_classes: int, reverse: bool = False) -> list[int]:
    """Per-class counts of a long-tailed split (the protocol of DARP, DASO and ACR): class k of K gets
    ⌊head · ratio^(−k/(K−1))⌋ images (at least 1), so class 0 has `head` and class K−1 head/ratio; reverse: class
    K−1 is the head. ratio 1: every class `head`. -> [K] ints."""
    if num_classes < 2:
        return [head] * num_classes
    counts = [max(1, int(head * ratio ** (-k / (num_classes - 1)))) for k in range(num_classes)]
    return counts[::-1] if reverse else counts


def long_tailed_indices(labels: torch.Tensor, counts: list[int], seed: int, exclude: torch.Tensor | None = None,
                        classes: list[str] | None = None, what: str = "labeled") -> torch.Tensor:
    """`counts[c]` indices of each class c at random (seeded), none from `exclude` (int64 indices). -> sorted int64.
    A class with fewer images than asked is an error naming it (`what` names the split in the message)."""
    labels_np = labels.cpu().numpy()
    allowed = np.ones(len(labels_np), dtype=bool)
    if exclude is not None:
        allowed[exclude.cpu().numpy()] = False
    rng = np.random.default_rng(seed)
    picked = []
    for cls, count in enumerate(counts):
        members = np.flatnonzero((labels_np == cls) & allowed)
        if len(members) < count:
            name = classes[cls] if classes else cls
            raise DataError(f"data.long_tail: the {what} split asks {count} images of class {name!r}, which has "
                            f"{len(members)} left; lower labels_per_class or long_tail.unlabeled_per_class")
        picked.append(rng.choice(members, size=count, replace=False))
    return torch.from_numpy(np.sort(np.concatenate(picked))).long()


def largest_head(labels: torch.Tensor, shares: list[float], exclude: torch.Tensor) -> int:
    """The largest head count h such that class c still has ⌊h · shares[c]⌋ images outside `exclude` for every c
    (shares: the counts relative to the head, in (0, 1]). -> int ≥ 0."""
    labels_np = labels.cpu().numpy().copy()
    labels_np[exclude.cpu().numpy()] = -1
    available = np.bincount(labels_np[labels_np >= 0], minlength=len(shares))
    return int(min(available[c] / share for c, share in enumerate(shares)))
