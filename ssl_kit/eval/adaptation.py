"""Domain adaptation beside generalisation: these see the target domain's (unlabeled) training images, which the
plain transfer evaluation never does.

- AdaBN (Li et al. 2016): re-estimate every BatchNorm layer's statistics on target images; weights unchanged.
- FixMatch-family adaptation (`adapt: fixmatch`), run as AdaMatch (Berthelot et al. 2022, methods/adamatch.py):
  labeled source + unlabeled target with the relative confidence threshold, distribution alignment to the source
  predictions and random logit interpolation of the source logits; compared with the same fine-tuning on the
  source alone, both scored on the target's test split.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..config import validate_recipe
from ..data.augment import Normalize
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


TrainRecipe = Callable[..., tuple]  # (recipe, out dir) -> (run dir, summary): the runner's run_recipe


def fixmatch_adaptation(checkpoint: str | Path, source: str, target: str, steps: int, seed: int,
                        train: TrainRecipe, device: str = "auto", out_dir: Optional[Path] = None,
                        threshold: float = 0.9) -> dict:
    """Fine-tune the checkpoint's backbone with a new head on labeled `source` + unlabeled `target` images with
    AdaMatch (relative threshold, distribution alignment to labeled predictions, random logit interpolation), and the same fine-tuning on the source
    alone (no target image seen, so BatchNorm statistics stay the source's). `train(recipe, out_dir)` runs the two
    stages (the runner's `run_recipe`: evaluation drives training without importing the runner).
    -> {"source_only_top1", "adapted_top1": target test top-1 of each, "run_dir": where both runs are}."""
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
    stages = [source_only, adapted]
    recipe = validate_recipe({"seed": seed, "name": "adapt", "stages": stages}, f"fixmatch adaptation to {target!r}")
    out = out_dir if out_dir is not None else Path(tempfile.mkdtemp(prefix="ssl-kit-adapt-"))
    _, summary = train(recipe, out)
    return {"source_only_top1": summary["source_only/test/top1"], "adapted_top1": summary["adapted/test/top1"],
            "run_dir": str(out)}
