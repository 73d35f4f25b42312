"""What a training stage's method draws from its data, declared by the method in one place
(`Method.data_needs(cfg)`): `prepare_data` and the loaders read only this."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataNeeds:
    """labels: the loss learns from labels, so a source without any is refused (False: a label-free method, every
    training image is drawn, labeled or not). unlabeled: an unlabeled pool is drawn beside the labeled batches, of
    `unlabeled_ratio` (μ) unlabeled images per labeled image in a batch."""

    labels: bool = True
    unlabeled: bool = False
    unlabeled_ratio: int = 0

    def __post_init__(self) -> None:
        if self.unlabeled_ratio < 0 or (self.unlabeled_ratio > 0) != self.unlabeled:
            raise ValueError(f"DataNeeds: an unlabeled pool goes with a ratio μ ≥ 1 and none with μ = 0, got "
                             f"unlabeled={self.unlabeled}, unlabeled_ratio={self.unlabeled_ratio}")
