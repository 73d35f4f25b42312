"""A module's training/eval mode for the length of a block."""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(module: nn.Module):
    """`module` in eval mode (BatchNorm on running statistics, no dropout) for the duration; its mode (and its
    children's, as `train()` sets them) restored afterwards, also when the block raises."""
    was_training = module.training
    module.train(False)
    try:
        yield module
    finally:
        module.train(was_training)
