"""Masking and patch helpers for masked image modeling (pure functions, batched)."""
from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor


def patchify(images: Tensor, patch: int) -> Tensor:
    """images (N, C, H, W) -> patches (N, L, patch²·C), L = (H/patch)·(W/patch), row-major."""
    return rearrange(images, "n c (h p) (w q) -> n (h w) (p q c)", p=patch, q=patch)


def unpatchify(patches: Tensor, patch: int, channels: int) -> Tensor:
    """patches (N, L, patch²·C) -> images (N, C, H, W) with H = W = √L · patch."""
    grid = int(math.isqrt(patches.shape[1]))
    return rearrange(patches, "n (h w) (p q c) -> n c (h p) (w q)", h=grid, w=grid, p=patch, q=patch, c=channels)


def random_masking(n: int, length: int, ratio: float, device=None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample random masking by argsort of uniform noise (no Python loop over samples).
    -> keep (N, K) indices of visible patches in shuffled order, mask (N, L) with 1 = masked (in the original
    order), restore (N, L) indices that undo the shuffle. K = round(L · (1 − ratio))."""
    keep_count = int(round(length * (1 - ratio)))
    noise = torch.rand(n, length, device=device)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(n, length, device=device)
    mask[:, :keep_count] = 0
    return shuffle[:, :keep_count], torch.gather(mask, 1, restore), restore


def block_masking(n: int, grid: int, ratio: float, device=None, min_block: int = 2) -> tuple[Tensor, Tensor, Tensor]:
    """BEiT-style blockwise masks: rectangles of random area and aspect ratio are added until round(L · ratio)
    patches are masked (trimmed or topped up at random to hit the count exactly, so every sample keeps the same
    number of patches). Same return values as random_masking."""
    length = grid * grid
    target = int(round(length * ratio))
    masks = torch.zeros(n, grid, grid)
    for sample in range(n):
        current = masks[sample]
        for _ in range(100):
            if int(current.sum()) >= target:
                break
            area = torch.randint(min_block, max(min_block + 1, target - int(current.sum()) + 1), ()).item()
            aspect = math.exp(torch.empty(()).uniform_(math.log(0.3), math.log(1 / 0.3)).item())
            h = max(1, min(grid, int(round(math.sqrt(area * aspect)))))
            w = max(1, min(grid, int(round(math.sqrt(area / aspect)))))
            top = torch.randint(0, grid - h + 1, ()).item()
            left = torch.randint(0, grid - w + 1, ()).item()
            current[top:top + h, left:left + w] = 1
    flat = masks.view(n, length)
    # exact count: rank patches so that masked ones come first (random order within each group)
    score = flat * 2 + torch.rand(n, length)
    order = score.argsort(dim=1, descending=True)
    mask = torch.zeros(n, length)
    mask.scatter_(1, order[:, :target], 1.0)
    mask = mask.to(device)
    noise = mask + torch.rand(n, length, device=device) * 0.5  # visible patches (0 + noise) sort first
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    return shuffle[:, :length - target], mask, restore


def make_mask(kind: str, n: int, grid: int, ratio: float, device=None) -> tuple[Tensor, Tensor, Tensor]:
    if kind == "block":
        return block_masking(n, grid, ratio, device)
    return random_masking(n, grid * grid, ratio, device)
