"""Backbones from torchvision with local weights, for evaluation: `--checkpoint torchvision:resnet18 --weights PATH`.

Nothing is downloaded: the weights are a local state-dict file (as torchvision saves them to its cache, e.g.
resnet18-f37072fd.pth), loaded with weights_only=True, or the word `random` for an untrained network. The
classification layer (the model's last nn.Linear) is replaced by an identity, so the backbone maps images
(N, 3, H, W) to features (N, num_features); inputs are normalised with the ImageNet statistics torchvision uses.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torchvision.models as tv_models
from torch import nn

from ..common.files import safe_load
from ..errors import CheckpointError
from .torchvision_backbone import replace_classifier

PREFIX = "torchvision:"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
RANDOM_WEIGHTS = "random"


def is_torchvision_reference(checkpoint: str | Path) -> bool:
    return str(checkpoint).startswith(PREFIX)


def _unwrap_state(state: dict, path: str) -> dict:
    """Accept a bare state dict or one nested under 'state_dict' / 'model' (common checkpoint layouts)."""
    for key in ("state_dict", "model"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
    if not state or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{path!r} does not hold a state dict (parameter name -> tensor)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def torchvision_backbone(reference: str, weights: Optional[str], image_size: Optional[int] = None) -> nn.Module:
    """'torchvision:NAME' + a local weights file (or 'random') -> feature extractor with .data_info and .arch."""
    name = reference[len(PREFIX):]
    known = tv_models.list_models(module=tv_models)
    if name not in known:
        close = [k for k in known if name.split("_")[0] in k][:8]
        raise CheckpointError(f"unknown torchvision model {name!r} (e.g. {', '.join(close or known[:8])})")
    if weights is None:
        raise CheckpointError(f"{reference} needs --weights PATH, a local state-dict file (nothing is downloaded), "
                              f"or --weights {RANDOM_WEIGHTS} for an untrained network")
    model = tv_models.get_model(name, weights=None)
    if weights != RANDOM_WEIGHTS:
        state = _unwrap_state(safe_load(weights), weights)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"weights {weights!r} do not fit torchvision {name!r}: "
                                  f"{str(exc).splitlines()[0]} {str(exc).splitlines()[1:2]}") from None
    width = replace_classifier(model)[1]
    model.num_features = width
    model.arch = reference
    model.data_info = {"image_size": image_size or 224, "channels": 3, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                       "dataset": "imagenet", "classes": [], "num_classes": 1000}
    return model.eval()
