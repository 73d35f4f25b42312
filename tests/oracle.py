"""Shared helpers of the tests that check a loss against a reference (lightly as a test-time oracle, or a naive
formula): seeded inputs, a loss with the gradients of its inputs, and equality of both within 1e-5."""
from __future__ import annotations

import torch

TOL = dict(atol=1e-5, rtol=1e-5)


def randn(*shape, seed=0):
    """A standard normal tensor of `shape` from its own generator seeded `seed` (the global RNG is untouched)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def value_and_grads(fn, *inputs):
    """fn(*leaves) -> (loss, gradients of each input)."""
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    loss = fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def assert_same(ours, theirs):
    """(loss, grads) pairs from value_and_grads equal within TOL."""
    torch.testing.assert_close(ours[0], theirs[0], **TOL)
    for a, b in zip(ours[1], theirs[1]):
        torch.testing.assert_close(a, b, **TOL)
