"""The CAPI predictor (Darcet et al. 2025; facebookresearch/capi, model.py `EncoderDecoder.decoder`): a stack of pure
cross-attention blocks. One learned mask token per position to predict is the query; it attends to the encoder's
outputs (the visible tokens) and never to the other queries, so each prediction depends on the visible tokens and
its own position only. Positions enter as 2-D rotary embeddings (RoPE) of coordinates in [0, 1]² applied to queries
and keys, not as additive embeddings.

As the reference: pre-norm residual blocks (RMSNorm, eps 1e-5) of q/k/v/output projections without bias and a
4× GELU MLP without bias, the keys and values read from the (already normalised) encoder output directly, a final
RMSNorm without affine parameters, Linear weights xavier-uniform, the mask token N(0, 0.02²), the RoPE frequencies
fixed (the reference trains them at lr × rope_lr_mult = 0). I-JEPA's predictor (jepa_predictor.py) does not fit:
it self-attends over [context, queries], so queries see each other and the context is updated block by block."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vit import DropPath

ROPE_MAX_FREQ, ROPE_MIN_FREQ = 7.0, 7e-4  # the reference's Rope defaults


def grid_coordinates(grid: int) -> Tensor:
    """(grid², 2) float coordinates of the row-major patches of a grid × grid image: (row, column) in [0, 1]."""
    axis = torch.linspace(0, 1, grid)
    return torch.cartesian_prod(axis, axis)


def rope_frequencies(head_dim: int) -> Tensor:
    """(2, head_dim) angular frequencies of 2-D RoPE: head_dim / 4 frequencies log-spaced from 7 to 7e-4, each
    duplicated for its rotation pair; the first half of the channels rotates with the row, the second with the
    column."""
    if head_dim % 4:
        raise ValueError(f"2-D rotary embeddings need a head width divisible by 4, got {head_dim}")
    freqs = ROPE_MAX_FREQ * (ROPE_MAX_FREQ / ROPE_MIN_FREQ) ** torch.linspace(0, -1, head_dim // 4)
    freqs = torch.cat([freqs, freqs])
    table = torch.zeros(2, head_dim)
    table[0, : head_dim // 2] = freqs
    table[1, -head_dim // 2:] = freqs
    return table * 2 * math.pi


def apply_rope(x: Tensor, coords: Tensor, freqs: Tensor) -> Tensor:
    """x (N, H, T, d) per-head tokens, coords (N, T, 2), freqs (2, d) -> x rotated by angle coords @ freqs."""
    angle = (coords.to(freqs.dtype) @ freqs).unsqueeze(1).to(x.dtype)  # (N, 1, T, d)
    first, second = x.chunk(2, dim=-1)
    return x * angle.cos() + torch.cat([-second, first], dim=-1) * angle.sin()


class CrossAttentionBlock(nn.Module):
    """queries (N, P, D) + attention to context (N, C, D) -> (N, P, D): x + attn(norm(x), context), x + MLP(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"predictor width {dim} is not divisible by its {heads} heads")
        self.heads = heads
        self.norm1 = nn.RMSNorm(dim, eps=1e-5)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm2 = nn.RMSNorm(dim, eps=1e-5)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, dim, bias=False))
        self.drop_path = DropPath(drop_path)
        self.register_buffer("freqs", rope_frequencies(dim // heads), persistent=False)

    def split(self, x: Tensor) -> Tensor:
        """(N, T, D) -> (N, H, T, D / H)."""
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def attention(self, x: Tensor, coords: Tensor, context: Tensor, context_coords: Tensor) -> Tensor:
        """x (N, P, D) at coords (N, P, 2) attends to context (N, C, D) at context_coords (N, C, 2) -> (N, P, D)."""
        q = apply_rope(self.split(self.q_proj(x)), coords, self.freqs)
        k = apply_rope(self.split(self.k_proj(context)), context_coords, self.freqs)
        out = F.scaled_dot_product_attention(q, k, self.split(self.v_proj(context)))
        return self.proj(out.transpose(1, 2).reshape(x.shape))

    def forward(self, x: Tensor, coords: Tensor, context: Tensor, context_coords: Tensor) -> Tensor:
        x = x + self.drop_path(self.attention(self.norm1(x), coords, context, context_coords))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CAPIPredictor(nn.Module):
    """context (N, C, D) encoder outputs at coordinates (N, C, 2), query coordinates (N, P, 2) -> predicted tokens
    (N, P, D) of the P positions. D: the encoder's width (the reference's decoder has the encoder's width)."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, heads, mlp_ratio, drop_path) for _ in range(depth))
        self.norm = nn.RMSNorm(dim, eps=1e-5, elementwise_affine=False)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)

    def forward(self, context: Tensor, context_coords: Tensor, query_coords: Tensor) -> Tensor:
        x = self.mask_token.to(context.dtype).expand(context.shape[0], query_coords.shape[1], -1)
        for block in self.blocks:
            x = block(x, query_coords, context, context_coords)
        return self.norm(x)
