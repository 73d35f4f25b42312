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
