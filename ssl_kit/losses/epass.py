"""EPASS (Khanh-Binh Nguyen 2023, "Ensemble Projectors Aided for Semi-supervised Learning", arXiv 2308.13764;
code github.com/beandkay/EPASS, built on USB): the embedding of an image is the L2-normalised mean of the raw
(unnormalised) outputs of an ensemble of projection heads, as the reference's CoMatch_Net / SimMatch_Net.forward:
l2norm((mlp_proj(f) + mlp_proj_2(f) + mlp_proj_3(f)) / 3).

Shapes: outputs a sequence of P tensors (N, D) (or one stacked tensor (P, N, D)), the P projectors' outputs for the
same N images; the ensemble embedding is (N, D)."""
from __future__ import annotations

from typing import Sequence, Union

import torch.nn.functional as F
from torch import Tensor

from ._checks import stack_rows


def ensemble_embeddings(outputs: Union[Sequence[Tensor], Tensor]) -> Tensor:
    """The EPASS ensemble embedding: z = normalise((1/P) Σ_p outputs_p) (N, D) in float32, the mean taken over the
    P projectors' unnormalised outputs (N, D) each (a sequence, or one (P, N, D) tensor), then L2-normalised per row.
    P = 1 gives normalise(outputs_0), a single projection head's embedding, bit for bit. -> (N, D)."""
    stacked = stack_rows("outputs", outputs, "projector output", "(P, N, D)")
    return F.normalize(stacked.float().mean(dim=0), dim=1)
