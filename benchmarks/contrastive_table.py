"""Contrastive pretraining (SimCLR, MoCo v2, MoCo v3) vs. a randomly initialised backbone vs. logistic regression on
raw pixels, by linear probe (4 and 10 labels per class, and all labels) and kNN (issue 3). Also a temperature sweep.
The raw pixels are scored twice: by scikit-learn's logistic regression (C 1, the table's first baseline) and by the
linear probe every backbone row gets (ssl_kit's lr/wd sweep on a validation split), the like-for-like bar.

    python benchmarks/contrastive_table.py --dataset digits --epochs 100 --device cuda [--temperatures 0.05 0.1 0.2 0.5 1.0]
    python benchmarks/contrastive_table.py --methods --backbones MSN=runs/msn/backbone.pt "MSN untrained=..."
    python benchmarks/contrastive_table.py --methods --seed 1 --dinov2-readouts --backbones DINOv2=runs/dinov2/backbone.pt

`--backbones NAME=PATH` adds rows for backbones trained elsewhere (e.g. `ssl-kit run msn_digits`: the ViT methods'
own recipes), scored by the same probes and kNN.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import linear_probe_on_pixels, logistic_regression_on_pixels, run_stages, table  # noqa: E402
from ssl_kit.engine.checkpoint import build_from_record  # noqa: E402
from ssl_kit.eval.features import FeatureExtractor  # noqa: E402
from ssl_kit.eval.stages import knn_dataset, probe_dataset  # noqa: E402
from ssl_kit.methods import build_method  # noqa: E402
from ssl_kit.models.registry import build_backbone  # noqa: E402


METHOD_KEYS = {  # keys of one method on top of the shared ones (its ssl_kit/recipes/<method>_digits.yaml values)
    "swav": {"temperature": 0.1, "n_prototypes": 100, "local_crops": 2, "local_crop_size": 0.5,
             "local_crop_scale": [0.1, 0.4], "queue_length": 512, "queue_start_epochs": 20,
             "freeze_prototypes_epochs": 1},
    "nnclr": {"proj_hidden_dim": 128, "proj_dim": 64, "pred_hidden_dim": 128, "support_set_size": 1024},
    "supcon": {"proj_hidden_dim": 128, "proj_dim": 64},
    "ibot": {"backbone": {"name": "vit_tiny", "kwargs": {"patch_size": 4, "dim": 96, "depth": 4, "heads": 3}},
             "out_dim": 1024, "head_hidden_dim": 256, "bottleneck_dim": 64, "momentum": 0.99, "local_crops": 2,
             "local_crop_size": 0.5, "global_crop_scale": [0.4, 1.0], "local_crop_scale": [0.1, 0.4],
             "gaussian_blur": [0.0, 0.0, 0.0], "solarization_prob": 0.0, "warmup_teacher_temp_epochs": 10,
             "masking": "random", "views": {"jitter_strength": 0.5, "grayscale_prob": 0.0},
             "optimizer": {"name": "adamw", "lr": 5e-4, "lr_scaling": "linear", "weight_decay": 0.04}},
    "byol": {"pred_hidden_dim": 128},
    "simsiam": {"pred_hidden_dim": 32, "optimizer": {"name": "sgd", "lr": 0.5, "lr_scaling": "linear",
                                                     "weight_decay": 1e-5}},
    "barlow_twins": {"proj_hidden_dim": 256, "proj_dim": 256, "lambda_offdiag": 5e-3, "scale_loss": 0.1},
    "vicreg": {"proj_hidden_dim": 256, "proj_dim": 256},
    "dcl": {"weighting": "none"},
    "tico": {"proj_hidden_dim": 256, "beta": 0.9, "rho": 8.0},
    "mmcr": {"n_views": 4, "lambda_local": 0.0},
    "lejepa": {"sigreg_weight": 0.05, "num_slices": 256, "proj_hidden_dim": 512, "proj_dim": 64, "global_views": 2,
               "local_crops": 4, "local_crop_size": 0.5, "global_crop_scale": [0.4, 1.0],
               "local_crop_scale": [0.1, 0.4], "blur_prob": 0.0, "solarize_prob": 0.0,
               "views": {"jitter_prob": 0.8, "jitter_strength": 0.5, "grayscale_prob": 0.0},
               "optimizer": {"name": "adamw", "lr": 2e-3, "weight_decay": 5e-4},
               "schedule": {"name": "cosine", "warmup_epochs": 2, "warmup_start": 0.01, "min_lr_ratio": 0.001}},
}


def pretrain_stage(method: str, dataset: str, epochs: float, size: int, width: int, temperature: float, device: str):
    """The shared digits setup with METHOD_KEYS[method] on top; keys the method's config lacks (a queue for
    SimCLR, a temperature for BYOL) are left out."""
    stage = _shared_stage(method, dataset, epochs, size, width, temperature, device)
    stage.update(METHOD_KEYS.get(method, {}))
    fields = build_method(method).config_class.model_fields
    return {key: value for key, value in stage.items() if key in fields}


def _shared_stage(method: str, dataset: str, epochs: float, size: int, width: int, temperature: float, device: str):
    return {"name": "pretrain", "method": method, "data": {"dataset": dataset, "image_size": size},
            "backbone": {"name": "small_cnn", "kwargs": {"width": width}}, "temperature": temperature,
            "proj_hidden_dim": 128, "proj_dim": 64, "queue_size": 1024, "momentum": 0.99,
            "views": {"crop_scale": [0.4, 1.0], "jitter_strength": 0.5, "grayscale_prob": 0.0},
            "optimizer": {"name": "lars", "lr": 0.3, "lr_scaling": "linear", "weight_decay": 1e-5},
            "schedule": {"name": "cosine", "warmup_epochs": min(2.0, epochs / 10)},
            "train": {"epochs": epochs, "batch_size": 256, "progress": False, "eval_every_epochs": 0,
                      "device": device, "checkpoint_every_steps": 100_000}}


FULL_PROBE = True


def evaluate(extractor: FeatureExtractor, dataset: str, labels: list[int], seed: int) -> list:
    scores: list = [probe_dataset(extractor, dataset, 100, n, seed)["top1"] for n in labels]
    scores.append(probe_dataset(extractor, dataset, 100, None, seed)["top1"] if FULL_PROBE else "-")
    scores.append(knn_dataset(extractor, dataset, 20, 0.07)["top1"])
    return scores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--methods", nargs="*", default=["simclr", "mocov2", "mocov3"])
    parser.add_argument("--epochs", type=float, default=100)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--labels", type=int, nargs="+", default=[4, 10])
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--temperatures", type=float, nargs="*", default=[], help="SimCLR temperature sweep")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-full-probe", action="store_true", help="skip the all-labels probe (large data sets)")
    parser.add_argument("--backbones", nargs="*", default=[], metavar="NAME=PATH",
                        help="also score these backbone.pt files (trained by their own recipes)")
    parser.add_argument("--dinov2-readouts", action="store_true",
                        help="also score each --backbones ViT as DINOv2's linear evaluation reads it: last 4 [cls], "
                             "[cls] + patch mean, both (--n-last-blocks 4 / --avgpool)")
    args = parser.parse_args()
    global FULL_PROBE
    FULL_PROBE = not args.no_full_probe
    headers = ["backbone"] + [f"probe {n}/class" for n in args.labels] + ["probe all", "kNN k=20"]
    rows = [["raw pixels + logistic regression"] + [logistic_regression_on_pixels(args.dataset, n, args.seed)
                                                    for n in args.labels] + ["-", "-"],
            ["raw pixels + the same linear probe"] + [linear_probe_on_pixels(args.dataset, n, args.seed)
                                                      for n in args.labels]
            + [linear_probe_on_pixels(args.dataset, None, args.seed) if FULL_PROBE else "-", "-"]]
    readouts = [(1, False, "")] + ([(4, False, ", last 4 [cls]"), (1, True, ", [cls] + patch mean"),
                                    (4, True, ", last 4 [cls] + patch mean")] if args.dinov2_readouts else [])
    for name, path in (item.split("=", 1) for item in args.backbones):
        for blocks, avgpool, label in readouts:
            extractor = FeatureExtractor.from_checkpoint(path, args.device, n_last_blocks=blocks, avgpool=avgpool)
            rows.append([name + label] + evaluate(extractor, args.dataset, args.labels, args.seed))
            print(table(headers, rows[-1:]), flush=True)
    record = None
    for method in args.methods:
        _, record = run_stages([pretrain_stage(method, args.dataset, args.epochs, args.size, args.width,
                                               args.temperature, args.device)], args.seed)
        rows.append([f"{method} ({args.epochs:g} epochs)"] + evaluate(FeatureExtractor(build_from_record(record),
                                                                                        args.device), args.dataset,
                                                                       args.labels, args.seed))
        print(table(headers, rows[-1:]), flush=True)
    if record is None:  # only --backbones: no random-init row (the table's is the small CNN's)
        print("\n" + table(headers, rows))
        return
    torch.manual_seed(args.seed)
    random_backbone = build_backbone("small_cnn", record["data"]["channels"], args.size, {"width": args.width})
    random_backbone.data_info = record["data"]
    rows.append(["random init"] + evaluate(FeatureExtractor(random_backbone, args.device), args.dataset, args.labels,
                                           args.seed))
    print("\n" + table(headers, rows))
    sweep = []
    for temperature in args.temperatures:
        _, rec = run_stages([pretrain_stage("simclr", args.dataset, args.epochs, args.size, args.width, temperature,
                                            args.device)], args.seed)
        sweep.append([temperature] + evaluate(FeatureExtractor(build_from_record(rec), args.device), args.dataset,
                                              args.labels, args.seed))
        print(table(["τ"] + headers[1:], sweep[-1:]), flush=True)
    if sweep:
        print("\n" + table(["SimCLR τ"] + headers[1:], sweep))


if __name__ == "__main__":
    main()
