"""Domain adaptation beside generalisation: these see the target domain's (unlabeled) training images, which the
plain transfer evaluation never does.

- AdaBN (Li et al. 2016): re-estimate every BatchNorm layer's statistics on target images; weights unchanged.
- FixMatch-family adaptation (`adapt: fixmatch`), run as AdaMatch (Berthelot et al. 2022, methods/adamatch.py):
  labeled source + unlabeled target with the relative confidence threshold, distribution alignment to the source
  predictions and random logit interpolation of the source logits; compared with the same fine-tuning on the
  source alone, both scored on the target's test split. That is training: this module only writes its recipe
  (adaptation_recipe); the runner trains it before the transfer stage scores, and evaluation never trains.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from ..data.views import Normalize
from ..engine.checkpoint import resolve_checkpoint
from ..errors import DataError

ADAPT_METHODS = ("adabn", "fixmatch")


@torch.no_grad()
def adapt_batchnorm(backbone: nn.Module, images: Tensor, normalize: Normalize, device: torch.device,
                    batch_size: int = 256) -> nn.Module:
    """A copy of `backbone` whose BatchNorm running statistics are re-estimated on `images` (uint8 (N, C, H, W) in
    the backbone's input format): the plain average of every batch's statistics (momentum None), so no earlier
    source statistics remain. The original is untouched."""
    adapted = copy.deepcopy(backbone).eval()
    norms = [m for m in adapted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise DataError(f"adaptation 'adabn' re-estimates BatchNorm statistics, but backbone "
                        f"{getattr(backbone, 'arch', type(backbone).__name__)!r} has no BatchNorm layers")
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average of the batches' statistics
        norm.train()
    for start in range(0, images.shape[0], batch_size):
        adapted(normalize(images[start:start + batch_size].to(device)))
    return adapted.eval()


def adaptation_recipe(checkpoint: str | Path, source: str, target: str, steps: int, seed: int,
                      device: str = "auto", threshold: float = 0.9) -> dict:
    """The training stages of FixMatch-family adaptation to `target`, as a recipe (a dict, validated by whoever runs
    it): the checkpoint's backbone fine-tuned with a new head on labeled `source` + unlabeled `target` images with
    AdaMatch (relative threshold, distribution alignment to labeled predictions, random logit interpolation), and
    the same fine-tuning on the source alone (no target image seen, so BatchNorm statistics stay the source's).
    Both score the target's test split (data.test). Evaluation builds this recipe; the runner trains it."""
    info = resolve_checkpoint(checkpoint)["data"]
    data = {"dataset": source, "test": target, "image_size": info["image_size"], "channels": info["channels"]}
    shared = {"init": {"checkpoint": str(checkpoint)},
              "optimizer": {"name": "sgd", "lr": 0.03, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
              "schedule": {"name": "fixmatch_cosine"},
              "train": {"steps": steps, "batch_size": 32, "eval_every_epochs": 0, "progress": False,
                        "device": device}}
    source_only = {"name": "source_only", "method": "supervised", "data": data, **copy.deepcopy(shared)}
    adapted = {"name": "adapted", "method": "adamatch", "threshold": threshold, "mu": 3, "eval_ema": False,
               "data": {**data, "unlabeled_dataset": target}, **copy.deepcopy(shared)}
    return {"seed": seed, "name": "adapt", "stages": [source_only, adapted]}


def adaptation_scores(summary: dict) -> dict:
    """The summary of an adaptation_recipe run -> the target test top-1 of each of its stages."""
    return {"fixmatch_source_only_top1": summary["source_only/test/top1"],
            "fixmatch_adapted_top1": summary["adapted/test/top1"]}
