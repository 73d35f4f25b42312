"""The one holdout policy of a file-indexed source: which images train and which are scored.

Training (data/pipeline.py) and every evaluation command (eval/features.py) open a source through one function,
data/opened.py's `open_source`, which takes its train/test positions from `split_positions`; so do the in-memory
splits of data/specs.py (`ssl-kit data`, a second domain appended to an in-memory set). A backbone is never scored
on images it was trained on as labeled data, whatever the command.
"""
from __future__ import annotations

import numpy as np

from .builtin import stratified_holdout
from .sources import FileIndex


def split_positions(index: FileIndex, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train (N,), test (M,)) int64 positions into `index`.

    The source's own test (else val) split when it has one, its labeled images only; else a seeded stratified
    holdout of `fraction` of each class of the *labeled* training images. Unlabeled images always stay in train:
    they cannot be scored, and a label-free method learns from them. A source without labels has an empty test."""
    train = index.split("train")
    for held in ("test", "val"):
        if held in index.splits:
            test = index.splits[held]
            return train, test[index.labels[test] >= 0]
    labeled = train[index.labels[train] >= 0]
    if len(labeled) == 0:
        return train, labeled
    _, test_rows = stratified_holdout(index.labels[labeled], fraction, seed)
    test = labeled[test_rows]
    return np.setdiff1d(train, test, assume_unique=True), test
