"""Runs `ssl-kit` under torchrun for the DDP tests (never used by users).

    python tests/ddp_worker.py [--deterministic-views] [--exit-rank1-at-step N] ssl-kit <ssl-kit arguments>

--deterministic-views   every random view, crop and mask becomes a fixed function of the image (see
                        `deterministic_views`), so one process can reproduce what several ranks compute
--exit-rank1-at-step N  rank 1 dies (os._exit, no cleanup) before training step N, in the first attempt only
                        (TORCHELASTIC_RESTART_COUNT == 0): a killed worker for the elastic-restart test
"""
from __future__ import annotations

import faulthandler
import os
import sys
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def deterministic_views(setattr_: Callable = setattr) -> None:
    """Make the per-sample randomness of every method a function of the image alone, however a global batch is split
    over ranks: on-device augmentation draws its random numbers per rank, so a single process drawing for the whole
    batch cannot draw what each rank drew. Contrastive/DINO/SwAV views (global and local crops) become a resize,
    mirrored too for a view with solarize_prob > 0 (the second view when a recipe sets views.solarize_prob, so that
    the two views differ and invariance terms are not trivially zero),
    FixMatch's strong view a horizontal mirror, the masked methods' crop the identity, MAE/SimMIM's mask one fixed
    random pattern and iBOT's masks one fixed random pattern of masked patches (per-image ratio and mask_prob are
    drawn per rank otherwise).
    Every projector/predictor MLP built by `ssl_kit.models.heads.mlp` becomes BatchNorm-free (Linear-ReLU, last
    Linear; no output BN): SimCLR, Barlow Twins, VICReg (contrastive.py), BYOL, SimSiam, NNCLR, SupCon, SwAV. Each
    method module imported `mlp` by name, so every loaded `ssl_kit.*` module holding the original is patched. BN
    normalises over the rank's batch, and torch's SyncBatchNorm is GPU-only, so on the CPU per-rank BN statistics
    differ from one process's by design; the comparison is of the methods' own gathering, not of BN."""
    import ssl_kit.methods  # noqa: F401  (every method module loaded, so each one's `mlp` can be patched)
    from ssl_kit.data import augment, views
    from ssl_kit.methods import ibot, masked, pretext
    from ssl_kit.models import heads
    from ssl_kit.models.masking import random_masking

    def contrastive_view(self, x):
        y = augment.to_unit_float(x)
        if self.out_size is not None:
            y = F.interpolate(y, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        return self.normalize(y.flip(-1) if self.solarize_prob > 0 else y)

    def strong_view(self, x):
        return self.normalize(augment.to_unit_float(x).flip(-1))

    def fixed_mask(kind, n, grid, ratio, device=None):
        state = torch.get_rng_state()
        torch.manual_seed(1234)
        keep, mask, restore = random_masking(1, grid * grid, ratio, device)
        torch.set_rng_state(state)
        return keep.expand(n, -1), mask.expand(n, -1), restore.expand(n, -1)

    def fixed_ibot_masks(n, grid, ratio, prob, kind, device=None):
        return fixed_mask(kind, n, grid, sum(ratio) / 2, device)[1].contiguous()

    def bn_free_mlp(in_dim, hidden, out_dim, layers=2, last_bn=False):
        modules, dim = [], in_dim
        for _ in range(layers - 1):
            modules += [nn.Linear(dim, hidden), nn.ReLU(inplace=True)]
            dim = hidden
        return nn.Sequential(*modules, nn.Linear(dim, out_dim))

    setattr_(views.ContrastiveView, "forward", contrastive_view)
    setattr_(views.StrongView, "forward", strong_view)
    setattr_(pretext, "random_resized_crop", lambda x, scale, hflip=True, out_size=None: x)  # MAE, SimMIM, I-JEPA, CAPI
    setattr_(masked, "make_mask", fixed_mask)
    setattr_(ibot, "ibot_masks", fixed_ibot_masks)
    original_mlp = heads.mlp
    for name, module in list(sys.modules.items()):
        if name.startswith("ssl_kit.") and getattr(module, "mlp", None) is original_mlp:
            setattr_(module, "mlp", bn_free_mlp)


def exit_rank1_at_step(step: int) -> None:
    from ssl_kit.engine.trainer import Trainer

    real_step = Trainer._train_step

    def dying_step(self):
        if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" \
                and self.step == step:
            print(f"[ddp_worker] rank 1 exits at step {step}", file=sys.stderr, flush=True)
            os._exit(17)
        return real_step(self)

    Trainer._train_step = dying_step


def main(argv: list[str]) -> None:
    separator = argv.index("ssl-kit")  # not "--": torchrun swallows a "--" right after the script
    options, rest = argv[:separator], argv[separator + 1:]
    faulthandler.enable(all_threads=True)  # a worker killed by a signal (SIGABRT at exit) prints where each thread was
    torch.set_num_threads(1)
    if "--deterministic-views" in options:
        deterministic_views()
    if "--exit-rank1-at-step" in options:
        exit_rank1_at_step(int(options[options.index("--exit-rank1-at-step") + 1]))
    from ssl_kit.cli import console_main

    console_main(rest)  # exits as the `ssl-kit` executable does under torchrun (engine.distributed.end_worker)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1:])
