"""Collapse watch for negative-free methods (BYOL, SimSiam, Barlow Twins, VICReg): the per-dimension standard
deviation of the L2-normalised embeddings over the batch, averaged over dimensions (SimSiam paper, §4.1).

Embeddings spread over the unit sphere give std ≈ 1/√D per dimension; a collapsed output (every image mapped to the
same vector) gives 0. The mean over an epoch is logged as `<method>/embedding_std`, and a warning fires once when
std·√D falls below `threshold` (default 0.1: a tenth of a healthy spread)."""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_THRESHOLD = 0.1


def embedding_std(z: Tensor) -> Tensor:
    """z (N, D) embeddings, not normalised -> scalar: mean over D of the std over N of F.normalize(z) (no grad)."""
    with torch.no_grad():
        return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


class EmbeddingStdWatch(nn.Module):
    """Accumulates `embedding_std` over an epoch for method `name`; `epoch_metrics()` logs the mean, resets, and
    warns once when it falls below threshold / √D."""

    def __init__(self, name: str, threshold: float = DEFAULT_THRESHOLD) -> None:
        super().__init__()
        self.name, self.threshold = name, threshold
        self.warned = False
        self.dim = 0
        self.register_buffer("_sum", torch.zeros(()), persistent=False)
        self.register_buffer("_count", torch.zeros(()), persistent=False)

    def update(self, z: Tensor) -> Tensor:
        """Add one batch of embeddings z (N, D); -> its embedding std (scalar, for the step log)."""
        std = embedding_std(z)
        self.dim = z.shape[1]
        self._sum += std
        self._count += 1
        return std

    def epoch_metrics(self) -> dict[str, float]:
        """{'<name>/embedding_std': epoch mean} (empty when no batch was seen); resets the accumulators."""
        if not float(self._count):
            return {}
        value = float(self._sum / self._count)
        self._sum.zero_()
        self._count.zero_()
        self.warn_if_collapsed(value)
        return {f"{self.name}/embedding_std": value}

    def warn_if_collapsed(self, std: float) -> None:
        """Warn once when std·√D < threshold: the embeddings have (nearly) collapsed to one point."""
        healthy = 1.0 / math.sqrt(max(1, self.dim))
        if not self.warned and std < self.threshold * healthy:
            warnings.warn(f"{self.name}: embedding std {std:.2e} is below {self.threshold:g}/√D = "
                          f"{self.threshold * healthy:.2e} (healthy ≈ 1/√D = {healthy:.2e}, D = {self.dim}): the "
                          f"embeddings look collapsed; check the learning rate, the predictor and the augmentations")
            self.warned = True
