"""EPASS (Khanh-Binh Nguyen 2023, "Ensemble Projectors Aided for Semi-supervised Learning", arXiv 2308.13764;
code github.com/beandkay/EPASS, built on USB) on CoMatch (`epass`): CoMatch unchanged except its projection head,
which becomes an ensemble of `num_projectors` heads (each USB's CoMatch_Net.mlp_proj, Linear-ReLU-Linear to
proj_size, initialised independently); an image's embedding is the L2-normalised mean of their unnormalised outputs
(`ensemble_embeddings`), as the reference's CoMatch_Net.forward (use_epass: True):
l2norm((mlp_proj(f) + mlp_proj_2(f) + mlp_proj_3(f)) / 3). That embedding feeds everything CoMatch's did: memory
smoothing, the memory bank and the graph-contrastive loss between two strong views.

The ensemble's first head is CoMatch's own (built where CoMatch builds it, from the same random stream), so
`num_projectors: 1` is CoMatch exactly. The reference also applies the ensemble to SimMatch; this method covers
CoMatch, the base of the paper's main results."""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from ..losses import ensemble_embeddings
from ..models.heads import linear_relu_linear
from .comatch import CoMatch, CoMatchConfig
from .registry import register
from .semi import USB_SGD

_EPASS = "beandkay/EPASS semilearn/algorithms/comatch/comatch.py, config/classic_cv/comatch/comatch_cifar10_40_0.yaml"


class EPASSConfig(CoMatchConfig):
    method: Literal["epass"]

    recommended = USB_SGD
    recommended_source = ("EPASS (Nguyen 2023) on CoMatch, reference config (" + _EPASS + ", use_epass True; "
                          "otherwise USB's CoMatch config): SGD Nesterov momentum 0.9, lr 0.03 (no batch scaling), "
                          "weight decay 5e-4, lr · cos(7πk/16K), uratio 7, ulb_loss_ratio 1.0")
    num_projectors: int = Field(3, ge=1, description="projection heads in the ensemble; the embedding is the "
                                                     "L2-normalised mean of their outputs (EPASS: 3, mlp_proj, "
                                                     "mlp_proj_2, mlp_proj_3 of CoMatch_Net); 1 = CoMatch")


class EnsembleProjector(nn.Module):
    """P projection heads over the same features; forward gives their ensemble embedding."""

    def __init__(self, heads: list[nn.Module]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, features: Tensor) -> Tensor:
        """features (N, F) -> normalise(mean over heads of head(features) (N, D)) (N, D), float32."""
        return ensemble_embeddings([head(features) for head in self.heads])


@register("epass", EPASSConfig)
class EPASS(CoMatch):
    """EPASS on CoMatch: CoMatch whose embeddings come from an ensemble of projection heads (the L2-normalised mean
    of their outputs)."""

    def __init__(self, cfg, backbone: nn.Module, info, num_unlabeled: int = 0) -> None:
        super().__init__(cfg, backbone, info, num_unlabeled)
        features = backbone.num_features
        extra = [linear_relu_linear(features, cfg.proj_size) for _ in range(cfg.num_projectors - 1)]
        self.projector = EnsembleProjector([self.projector, *extra])

    def features_and_embeddings(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (N, C, H, W) -> (logits (N, K), ensemble embeddings (N, proj_size), L2-normalised) of one
        backbone pass."""
        features = self.net.backbone(images)
        return self.net.head(features), self.projector(features)
