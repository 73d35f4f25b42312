"""The I-JEPA predictor (Assran et al. 2023, appendix A.1): a narrow ViT that maps the context encoder's tokens and
one mask token per target patch (carrying that patch's fixed 2-D sin-cos position) to predicted target-encoder
representations of the target patches.

As in the reference (facebookresearch/ijepa, VisionTransformerPredictor): encoder tokens are projected to the
predictor width and given the predictor's positions of their patches; each target block is predicted in its own
sequence [context tokens, the block's mask tokens]; pre-norm blocks, a final LayerNorm and a projection back to the
encoder width. Linear weights are truncated-normal (std 0.02), biases zero, and each block's output projections
(attention and MLP) are divided by √(2·layer) (the reference's fix_init_weight)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .vit import Block, sincos_pos_embed

INIT_STD = 0.02  # the reference's init_std


class JEPAPredictor(nn.Module):
    """context (N, C, E) encoder tokens at patch indices (N, C), target patch indices (N, M, T) of M blocks ->
    predictions (N, M, T, E). E: encoder width; `dim`: the predictor's (narrower) width."""

    def __init__(self, encoder_dim: int, grid: int, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"predictor width {dim} is not divisible by its {heads} heads")
        if dim % 4:
            raise ValueError(f"predictor width {dim} must be divisible by 4 (2-D sin-cos positions)")
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(dim, grid), persistent=False)  # (grid², dim)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, encoder_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.mask_token, std=INIT_STD)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            for layer, block in enumerate(self.blocks, start=1):
                block.proj.weight.div_(math.sqrt(2.0 * layer))
                block.mlp[-1].weight.div_(math.sqrt(2.0 * layer))

    def forward(self, context: Tensor, context_index: Tensor, target_index: Tensor) -> Tensor:
        """context (N, C, E): the context encoder's outputs at the patches context_index (N, C) (row-major patch
        numbers); target_index (N, M, T): the patches of M target blocks. -> (N, M, T, E), block by block."""
        n, c, _ = context.shape
        blocks, t = target_index.shape[1:]
        tokens = self.embed(context) + self.pos_embed[context_index].to(context.dtype)
        queries = self.mask_token.to(tokens.dtype) + self.pos_embed[target_index].to(tokens.dtype)
        x = torch.cat([tokens.unsqueeze(1).expand(-1, blocks, -1, -1), queries], dim=2).flatten(0, 1)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x[:, c:])).view(n, blocks, t, -1)
