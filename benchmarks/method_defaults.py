"""Every training method on its own defaults (`recommended`: the optimizer, schedule and clipping of its paper or
reference implementation, nothing else set): loss at the first and the last step of a short run on the builtin
digits, and whether it stays finite at other batch sizes and on a streamed folder of photos.

    python benchmarks/method_defaults.py --steps 100                 # the table in docs (digits, batch 64)
    python benchmarks/method_defaults.py --steps 3 --batch 32 256    # finite at batch sizes 32 and 256
    python benchmarks/method_defaults.py --steps 3 --data images:DIR # a streamed folder

Methods that need a teacher (kd, dkd) get one: a supervised stage trained first in the same recipe.
Prints one line per method; exit status 1 when a loss is not finite."""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

from ssl_kit.config import validate_recipe
from ssl_kit.methods import registered_methods
from ssl_kit.runner import run_recipe

NEEDS_TEACHER = ("kd", "dkd")
# visible patches only (MAE, I-JEPA, CAPI) or mask tokens
VIT_ONLY = ("capi", "dinov2", "ibot", "ijepa", "mae", "msn", "simmim")


def stage_for(method: str, data: str, batch: int, steps: int) -> list[dict]:
    """The stages that train `method` on its defaults: a tiny backbone, `steps` steps, nothing else set."""
    backbone = ({"name": "vit_tiny", "kwargs": {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2}}
                if method in VIT_ONLY else {"name": "small_cnn", "kwargs": {"width": 8}})
    common = {"data": {"dataset": data, "image_size": 16, "workers": 0},
              "train": {"steps": steps, "batch_size": batch, "progress": False, "eval_every_epochs": 0,
                        "log_every": 1}}
    stage = {"name": "train", "method": method, "backbone": backbone, **common}
    stages = []
    if method in NEEDS_TEACHER:
        stages.append({"name": "teacher", "method": "supervised", "backbone": {"name": "small_cnn", "kwargs": {"width": 8}},
                       **common})
        stage["teacher"] = {"from_stage": "teacher"}
    return stages + [stage]


def first_last_loss(run_dir: Path, stage: str) -> tuple[float, float]:
    """The loss logged at the first and at the last step of `stage` (metrics.jsonl, one row per step)."""
    losses = [row["loss"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if row.get("stage") == stage and row.get("kind") == "step"]
    return losses[0], losses[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, nargs="+", default=[64])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--methods", nargs="*", default=None)
    args = parser.parse_args()
    bad = 0
    for method in args.methods or list(registered_methods()):
        for batch in args.batch:
            recipe = validate_recipe({"seed": 0, "stages": stage_for(method, args.data, batch, args.steps)})
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    run_recipe(recipe, out=Path(tmp) / "run")
                    first, last = first_last_loss(Path(tmp) / "run", "train")
                    ok = math.isfinite(first) and math.isfinite(last)
                    line = f"{first:10.4f} {last:10.4f}"
                except Exception as exc:  # noqa: BLE001 - one line per method, whatever went wrong
                    ok, line = False, f"FAILED: {str(exc).splitlines()[0][:160]}"
            bad += not ok
            opt = recipe.stages[-1].optimizer
            print(f"{method:14s} batch {batch:4d} {opt.name:6s} lr {opt.lr:<8g} {line}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
