"""EPASS (Khanh-Binh Nguyen 2023, "Ensemble Projectors Aided for Semi-supervised Learning", arXiv 2308.13764;
code github.com/beandkay/EPASS, built on USB): the embedding of an image is the L2-normalised mean of the raw
(unnormalised) outputs of an ensemble of projection heads, as the reference's CoMatch_Net / SimMatch_Net.forward:
l2norm((mlp_proj(f) + mlp_proj_2(f) + mlp_proj_3(f)) / 3).

Shapes: outputs a sequence of P tensors (N, D) (or one stacked tensor (P, N, D)), the P projectors' outputs for the
same N images; the ensemble embedding is (N, D)."""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor


def ensemble_embeddings(outputs: Union[Sequence[Tensor], Tensor]) -> Tensor:
    """The EPASS ensemble embedding: z = normalise((1/P) Σ_p outputs_p) (N, D) in float32, the mean taken over the
    P projectors' unnormalised outputs (N, D) each (a sequence, or one (P, N, D) tensor), then L2-normalised per row.
    P = 1 gives normalise(outputs_0), a single projection head's embedding, bit for bit. -> (N, D)."""
    stacked = _stack(outputs)
    return F.normalize(stacked.float().mean(dim=0), dim=1)


def _stack(outputs: Union[Sequence[Tensor], Tensor]) -> Tensor:
    """The projectors' outputs as one (P, N, D) tensor; ValueError naming what is wrong otherwise."""
    if isinstance(outputs, Tensor):
        if outputs.ndim != 3:
            raise ValueError(f"outputs must be a (P, N, D) tensor or a sequence of (N, D) tensors, got shape "
                             f"{tuple(outputs.shape)}")
        stacked = outputs
    else:
        outputs = list(outputs)
        if not outputs:
            raise ValueError("outputs is empty: the ensemble needs at least one projector's output")
        for index, output in enumerate(outputs):
            if not isinstance(output, Tensor) or output.ndim != 2:
                raise ValueError(f"outputs[{index}] must be a 2-D tensor (N, D), got shape "
                                 f"{tuple(getattr(output, 'shape', ()))}")
            if output.shape != outputs[0].shape:
                raise ValueError(f"outputs[{index}] has shape {tuple(output.shape)} but outputs[0] has "
                                 f"{tuple(outputs[0].shape)}: every projector must give (N, D) for the same images")
        stacked = torch.stack(outputs)
    if stacked.shape[0] == 0:
        raise ValueError("outputs is empty: the ensemble needs at least one projector's output")
    return stacked
