"""Vision Transformer with fixed 2-D sin-cos position embeddings; can encode a subset of patches (for MAE)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpointing import run_blocks


def sincos_pos_embed(dim: int, grid: int, cls_token: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding (MAE): half the channels encode the row, half the column.
    -> (grid², dim), or (1 + grid², dim) with a zero row for the cls token."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    # MAE's convention: the first half encodes the w (column) coordinate, the second the h (row) coordinate
    table = np.concatenate([encode(cols), encode(rows)], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros((1, dim)), table], axis=0)
    return torch.from_numpy(table).float()


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability p."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.ndim - 1)), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), x + MLP(LN(x)). tokens (N, L, D) -> (N, L, D)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))
        self.drop_path = DropPath(drop_path)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attention(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """images (N, C, H, W) -> features (N, dim): the cls token, or the mean of patch tokens (global_pool).
    grad_checkpointing (backbone.grad_checkpointing) recomputes each block in the backward pass."""

    grad_checkpointing = False

    def __init__(self, image_size: int = 32, patch_size: int = 4, in_channels: int = 3, dim: int = 192,
                 depth: int = 12, heads: int = 3, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 global_pool: bool = False, num_registers: int = 0) -> None:
        super().__init__()
        if num_registers < 0:
            raise ValueError(f"num_registers must be >= 0, got {num_registers}")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.patch_size, self.grid = patch_size, image_size // patch_size
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # register tokens (Darcet et al. 2024): after [cls], no position embedding, dropped from encode's output;
        # num_registers 0 adds no parameter (same state dict as before)
        self.num_registers = num_registers
        self.reg_token = nn.Parameter(torch.zeros(1, num_registers, dim)) if num_registers else None
        self.register_buffer("pos_embed", sincos_pos_embed(dim, self.grid, cls_token=True).unsqueeze(0), persistent=False)
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, rate) for rate in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.global_pool = global_pool
        self.num_features = dim
        self.depth = depth
        nn.init.normal_(self.cls_token, std=0.02)
        if self.reg_token is not None:
            with torch.random.fork_rng():  # keep the other parameters' initialisation identical to num_registers=0
                nn.init.normal_(self.reg_token, std=1e-6)
        weight = self.patch_embed.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """images (N, C, H, W) -> patch tokens with position embedding (N, L, D), L = (H / patch)².
        Other input sizes than image_size (DINO's local crops) get the sin-cos table of their own grid."""
        tokens = self.patch_embed(x)
        grid = tokens.shape[-1]
        pos = self.pos_embed[:, 1:] if grid == self.grid else \
            sincos_pos_embed(tokens.shape[1], grid).to(tokens.device, tokens.dtype).unsqueeze(0)
        return tokens.flatten(2).transpose(1, 2) + pos

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """patch tokens (N, L', D) (all or a visible subset) -> normalised (N, 1 + L', D) with the cls token first.
        Register tokens (num_registers) ride between cls and the patches through the blocks and are dropped here."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        if self.reg_token is None:
            x = torch.cat([cls, tokens], dim=1)
            return self.norm(run_blocks(self.blocks, x, self.grad_checkpointing))
        regs = self.reg_token.expand(tokens.shape[0], -1, -1)
        x = self.norm(run_blocks(self.blocks, torch.cat([cls, regs, tokens], dim=1), self.grad_checkpointing))
        return torch.cat([x[:, :1], x[:, 1 + self.num_registers:]], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.encode(self.embed(x))
        return tokens[:, 1:].mean(dim=1) if self.global_pool else tokens[:, 0]
