"""Domain transfer table (issue 7): backbones trained on digits (supervised with all labels; SimCLR without labels;
FixMatch from the SimCLR backbone with 4 labels per class — the quickstart's stages), each evaluated with a linear
probe fitted on digits and scored on printed digits and rotated digits, beside the target-oracle bound (a probe
fitted on the target itself) and AdaBN; then leave-one-domain-out over the rotations 0/15/30/45/60/75.

    python benchmarks/transfer_table.py [--quick]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import table  # noqa: E402
from ssl_kit.cli import bundled_recipe_dir  # noqa: E402
from ssl_kit.config import validate_recipe  # noqa: E402
from ssl_kit.eval.features import FeatureExtractor  # noqa: E402
from ssl_kit.eval.transfer import leave_one_domain_out, transfer_eval  # noqa: E402
from ssl_kit.runner import run_recipe  # noqa: E402

RECIPES = bundled_recipe_dir()
TARGETS = ["digits-printed", "digits-rotated:15", "digits-rotated:30", "digits-rotated:45", "digits-rotated:60"]
ROTATIONS = [f"digits-rotated:{a}" for a in (0, 15, 30, 45, 60, 75)]


def train_backbones(out: Path, quick: bool) -> dict[str, Path]:
    """-> {name: backbone.pt} for supervised, SimCLR and FixMatch (training stages of the bundled recipes)."""
    quickstart = yaml.safe_load((RECIPES / "quickstart.yaml").read_text())
    supervised = yaml.safe_load((RECIPES / "supervised_digits.yaml").read_text())
    training = [s for s in quickstart["stages"] if s["name"] in ("pretrain", "fixmatch")]
    sup = [s for s in supervised["stages"] if s["name"] == "supervised"]
    sup[0]["data"]["image_size"] = 16  # same input size as the quickstart's backbones
    sup[0]["backbone"] = training[0]["backbone"]
    if quick:
        training[0]["train"]["epochs"], training[1]["train"]["steps"], sup[0]["train"]["epochs"] = 5, 50, 3
    run_recipe(validate_recipe({"seed": 0, "name": "ssl", "stages": training}), out / "quickstart")
    run_recipe(validate_recipe({"seed": 0, "name": "sup", "stages": sup}), out / "supervised")
    return {"supervised (all labels)": out / "supervised" / "stages" / "supervised" / "backbone.pt",
            "SimCLR (no labels)": out / "quickstart" / "stages" / "pretrain" / "backbone.pt",
            "SimCLR → FixMatch (40 labels)": out / "quickstart" / "stages" / "fixmatch" / "backbone.pt"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/transfer-table")
    parser.add_argument("--quick", action="store_true", help="a few steps only (checks the script runs)")
    parser.add_argument("--epochs", type=int, default=100, help="linear probe epochs")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        sys.exit(f"{out} exists; choose another --out")
    backbones = train_backbones(out, args.quick)
    rows, lodo_rows = [], []
    for name, path in backbones.items():
        extractor = FeatureExtractor.from_checkpoint(path, "cpu")
        result = transfer_eval(extractor, "digits", TARGETS, args.epochs, adapt=["adabn"])
        rows.append([name, "digits (source)", result["source"]["top1"], "-", "-"])
        for target, metrics in result["targets"].items():
            rows.append([name, target, metrics["top1"], metrics["adabn_top1"], metrics["oracle_top1"]])
        lodo = leave_one_domain_out(extractor, ROTATIONS, args.epochs)
        lodo_rows.append([name] + [lodo["domains"][d]["top1"] for d in ROTATIONS] + [lodo["average"]["top1"]])
        print(table(["backbone", "domain", "source probe", "AdaBN", "target oracle"], rows[-len(TARGETS) - 1:]),
              flush=True)
    print("\nTransfer from digits (frozen backbone, linear probe fitted on digits; oracle = probe fitted on the "
          "target):\n" + table(["backbone", "domain", "source probe", "AdaBN", "target oracle"], rows))
    print("\nLeave-one-rotation-out (probe on the other five rotations, selection on their validation split):\n"
          + table(["backbone"] + [d.split(":")[1] + "°" for d in ROTATIONS] + ["average"], lodo_rows))


if __name__ == "__main__":
    main()
