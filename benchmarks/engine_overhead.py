"""Engine overhead and supervised accuracy/throughput (issue 2).

overhead = step time of the full engine (on-device weak augmentation, schedule, logging bookkeeping, NaN check,
EMA off) / a bare `forward/backward/step` loop on the same model, batch and optimizer, measured interleaved in one
process. Also trains each model briefly and reports test top-1 and images/s.

    python benchmarks/engine_overhead.py [--models small_cnn resnet18] [--datasets digits fashion-mnist] [--device cpu]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import engine_vs_bare, table  # noqa: E402
from ssl_kit.config import validate_recipe  # noqa: E402
from ssl_kit.data.pipeline import prepare_data  # noqa: E402
from ssl_kit.engine.trainer import RunContext, Trainer  # noqa: E402
from ssl_kit.methods.supervised import Supervised  # noqa: E402
from ssl_kit.models.registry import build_backbone  # noqa: E402
from ssl_kit.runner import run_recipe  # noqa: E402

MODELS = {"small_cnn": {"width": 32}, "resnet18": {"small_stem": True}}


def stage(model: str, dataset: str, epochs: float, batch: int, device: str) -> dict:
    return {"name": "supervised", "method": "supervised", "data": {"dataset": dataset, "image_size": 32},
            "backbone": {"name": model, "kwargs": MODELS[model]},
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
            "schedule": {"name": "cosine", "warmup_epochs": min(1.0, epochs / 5)},
            "train": {"epochs": epochs, "batch_size": batch, "progress": False, "eval_every_epochs": 0,
                      "checkpoint_every_steps": 10_000, "device": device}}


def overhead(model: str, dataset: str, batch: int, device: str, steps: int, rounds: int) -> tuple[float, float]:
    cfg = validate_recipe({"seed": 0, "stages": [stage(model, dataset, 1, batch, device)]}).stages[0]
    data = prepare_data(cfg.data, 0)
    torch.manual_seed(0)
    backbone = build_backbone(model, data.info.channels, 32, MODELS[model])
    method = Supervised(cfg, backbone, data.info)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(method, data, cfg, RunContext(Path(tmp), 0), {})
        bare_model = Supervised(cfg, build_backbone(model, data.info.channels, 32, MODELS[model]), data.info).net
        batch0 = trainer.loader.batch(0)
        x = method.normalize(batch0.x).to(trainer.device)
        times = engine_vs_bare(trainer, bare_model.to(trainer.device).train(), x, batch0.y, steps, rounds)
    return times["engine"] / times["bare"], batch / times["engine"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["small_cnn", "resnet18"])
    parser.add_argument("--datasets", nargs="+", default=["digits", "fashion-mnist"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=float, nargs="+", default=None, help="training epochs per dataset")
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    epochs = args.epochs or [15 if d == "digits" else 1 for d in args.datasets]
    for model in args.models:
        for dataset, n_epochs in zip(args.datasets, epochs):
            ratio, engine_ips = overhead(model, dataset, args.batch, args.device, steps=5, rounds=5)
            top1 = ips = float("nan")
            if not args.skip_train:
                recipe = validate_recipe({"seed": 0, "stages": [stage(model, dataset, n_epochs, args.batch, args.device)]})
                with tempfile.TemporaryDirectory() as tmp:
                    _, summary = run_recipe(recipe, Path(tmp) / "run")
                top1, ips = summary["supervised/test/top1"], summary["supervised/images_per_s"]
            rows.append([model, dataset, n_epochs, top1, ips, ratio])
            print(table(["model", "data", "epochs", "test top1", "train img/s", "engine / bare step"], rows[-1:]),
                  flush=True)
    print("\n" + table(["model", "data", "epochs", "test top1", "train img/s", "engine / bare step"], rows))


if __name__ == "__main__":
    main()
