"""Masked image modeling (issue 5).

Speed: one MAE training step with mask 0.75 (encoder on visible patches + light decoder) vs. a SimMIM step with the
same encoder on all patches, same batch, interleaved (target: MAE ≥ 2.5× faster).
Accuracy: fine-tuning (layer-wise lr decay 0.65) at 10 labels/class, linear probe and kNN of MAE and SimMIM
backbones vs. the same ViT from scratch, on digits.

    python benchmarks/mim_table.py [--skip-accuracy] [--device cpu]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import run_stages, table, time_interleaved  # noqa: E402
from ssl_kit.cli import bundled_recipe_dir  # noqa: E402
from ssl_kit.config import validate_recipe  # noqa: E402
from ssl_kit.recipe_files import load_yaml  # noqa: E402
from ssl_kit.data.pipeline import prepare_data  # noqa: E402
from ssl_kit.engine.trainer import RunContext, Trainer  # noqa: E402
from ssl_kit.methods import build_method  # noqa: E402
from ssl_kit.models.registry import build_backbone  # noqa: E402

RECIPES = bundled_recipe_dir()


def speed(device: str, size: int, batch: int, backbone: dict) -> list:
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("mae", "simmim"):
            stage = {"name": method, "method": method, "data": {"dataset": "digits", "image_size": size},
                     "backbone": backbone, "mask_ratio": 0.75,
                     "optimizer": {"name": "adamw", "lr": 1e-4}, "train": {"steps": 1000, "batch_size": batch,
                                                                            "progress": False, "device": device}}
            cfg = validate_recipe({"seed": 0, "stages": [stage]}).stages[0]
            data = prepare_data(cfg.data, 0)
            net = build_backbone(backbone["name"], data.info.channels, size, backbone["kwargs"])
            trainers[method] = Trainer(build_method(method)(cfg, net, data.info), data, cfg, RunContext(Path(tmp), 0), {})

        def step(trainer):
            return lambda: (trainer._train_step(), setattr(trainer, "step", (trainer.step + 1) % trainer.total_steps))

        times = time_interleaved({m: step(t) for m, t in trainers.items()}, 3, 5, trainers["mae"].device)
    return [f"{backbone['name']} {backbone['kwargs']}", size, batch, times["mae"] * 1e3, times["simmim"] * 1e3,
            times["simmim"] / times["mae"]]


def accuracy(device: str, seed: int) -> list:
    """Pretrain (MAE / SimMIM) -> fine-tune at 10 labels/class; probes and kNN of the pretrained encoder; scratch."""
    recipe = load_yaml(RECIPES / "mae_digits.yaml")
    pretrain, finetune = recipe["stages"][0], recipe["stages"][1]
    for stage in (pretrain, finetune):
        stage["train"] = {**stage["train"], "device": device, "progress": False}
    simmim = {**pretrain, "method": "simmim", "mask_ratio": 0.6}
    for key in ("norm_pix", "decoder_dim", "decoder_depth", "decoder_heads"):
        simmim.pop(key, None)
    evals = [{"name": "probe10", "method": "linear_probe", "from_stage": "pretrain", "labels_per_class": 10},
             {"name": "probe", "method": "linear_probe", "from_stage": "pretrain"},
             {"name": "knn", "method": "knn", "from_stage": "pretrain"}]
    scratch = {**finetune, "init": {}, "backbone": pretrain["backbone"]}
    rows = []
    for name, stages in (("MAE", [pretrain, finetune] + evals), ("SimMIM", [simmim, finetune] + evals),
                         ("from scratch", [scratch])):
        summary, _ = run_stages(stages, seed)
        rows.append([name, summary["finetune/test/top1"]] + [summary.get(f"{k}/top1", "-")
                                                               for k in ("probe10", "probe", "knn")])
        print(table(["backbone", "fine-tune 10/class", "probe 10/class", "probe all", "kNN"], rows[-1:]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    rows = [speed(args.device, 32, 128, {"name": "vit_small", "kwargs": {"patch_size": 4, "depth": 6}}),
            speed(args.device, 16, 256, {"name": "vit_tiny", "kwargs": {"patch_size": 4, "dim": 96, "depth": 4, "heads": 3}})]
    print(table(["encoder", "px", "batch", "MAE ms/step", "all patches ms/step", "MAE speed-up"], rows), flush=True)
    if not args.skip_accuracy:
        print("\n" + table(["backbone", "fine-tune 10/class", "probe 10/class", "probe all", "kNN"],
                           accuracy(args.device, args.seed)))


if __name__ == "__main__":
    main()
