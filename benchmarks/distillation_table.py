"""Knowledge distillation and DINO on digits (issue 6).

KD: runs ssl_kit/recipes/kd_digits.yaml (FixMatch teacher with 10 labels/class, 16× smaller student) and reports
teacher, student from labels, student with KD (labeled), student with KD (labeled + unlabeled), and the share of the
student→teacher gap that KD with unlabeled data closes (target ≥ 0.5).
DINO: runs ssl_kit/recipes/dino_digits.yaml's pretraining and compares linear probe / kNN with SimCLR and random init
(same evaluation as benchmarks/contrastive_table.py).

KD variants (issue 17): runs ssl_kit/recipes/dkd_digits.yaml (two FixMatch teachers of widths 16 and 8, students of
width 4 with labeled + unlabeled images) plus a labels-only student, and reports KD vs DKD vs two-teacher KD vs KD +
FitNets hint, each with the share of the (width-16) teacher–student gap it closes. `--variant-steps N` shortens every
stage.

    python benchmarks/distillation_table.py [--skip-dino] [--skip-variants] [--variant-steps N] [--device cpu]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import run_stages, table  # noqa: E402
from benchmarks.contrastive_table import evaluate, pretrain_stage  # noqa: E402
from ssl_kit.cli import bundled_recipe_dir  # noqa: E402
from ssl_kit.recipe_files import load_yaml  # noqa: E402
from ssl_kit.engine.checkpoint import build_from_record  # noqa: E402
from ssl_kit.eval.features import FeatureExtractor  # noqa: E402
from ssl_kit.models.registry import build_backbone  # noqa: E402

RECIPES = bundled_recipe_dir()


def with_device(stages: list[dict], device: str) -> list[dict]:
    for stage in stages:
        if "train" in stage:
            stage["train"] = {**stage["train"], "device": device, "progress": False}
    return stages


def kd_table(device: str, seed: int) -> str:
    stages = with_device(load_yaml(RECIPES / "kd_digits.yaml")["stages"], device)
    summary, _ = run_stages(stages, seed)
    names = ["teacher", "student_labels", "student_kd", "student_kd_unlabeled"]
    top1 = {name: summary[f"{name}/test/top1"] for name in names}
    gap = top1["teacher"] - top1["student_labels"]
    closed = (top1["student_kd_unlabeled"] - top1["student_labels"]) / gap if gap > 0 else float("nan")
    rows = [[name, top1[name]] for name in names]
    return table(["model", "test top1"], rows) + f"\n\nshare of the gap closed by KD with unlabeled data: {closed:.2f}"


def kd_variants_table(device: str, seed: int, steps: int | None = None) -> str:
    stages = with_device(load_yaml(RECIPES / "dkd_digits.yaml")["stages"], device)
    student = next(s for s in stages if s["name"] == "student_kd")
    stages.insert(2, {"name": "student_labels", "method": "supervised", "data": student["data"],
                      "backbone": student["backbone"], "optimizer": student["optimizer"],
                      "schedule": student["schedule"], "train": student["train"]})
    if steps is not None:
        for stage in stages:
            stage["train"] = {**stage["train"], "steps": steps}
    summary, _ = run_stages(stages, seed)
    top1 = {stage["name"]: summary[f"{stage['name']}/test/top1"] for stage in stages}
    gap = top1["teacher"] - top1["student_labels"]
    rows = [[name, value, (value - top1["student_labels"]) / gap if gap > 0 and name.startswith("student_") else ""]
            for name, value in top1.items()]
    return table(["model", "test top1", "share of the teacher–student gap closed"], rows)


def dino_table(device: str, seed: int, labels: list[int]) -> str:
    stages = with_device(load_yaml(RECIPES / "dino_digits.yaml")["stages"][:1], device)
    _, dino_record = run_stages(stages, seed)
    _, simclr_record = run_stages([pretrain_stage("simclr", "digits", 100, 16, 16, 0.5, device)], seed)
    headers = ["backbone"] + [f"probe {n}/class" for n in labels] + ["probe all", "kNN k=20"]
    rows = []
    for name, record in (("DINO (100 epochs)", dino_record), ("SimCLR τ 0.5 (100 epochs)", simclr_record)):
        rows.append([name] + evaluate(FeatureExtractor(build_from_record(record), device), "digits", labels, seed))
    torch.manual_seed(seed)
    random_backbone = build_backbone("small_cnn", 1, 16, {"width": 16})
    random_backbone.data_info = dino_record["data"]
    rows.append(["random init"] + evaluate(FeatureExtractor(random_backbone, device), "digits", labels, seed))
    return table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-kd", action="store_true")
    parser.add_argument("--skip-dino", action="store_true")
    parser.add_argument("--skip-variants", action="store_true", help="skip KD vs DKD vs two teachers vs hint")
    parser.add_argument("--variant-steps", type=int, default=None, help="steps of every stage of the variants table")
    args = parser.parse_args()
    if not args.skip_kd:
        print(kd_table(args.device, args.seed), flush=True)
    if not args.skip_variants:
        print(kd_variants_table(args.device, args.seed, args.variant_steps), flush=True)
    if not args.skip_dino:
        print(dino_table(args.device, args.seed, [4, 10]), flush=True)


if __name__ == "__main__":
    main()
