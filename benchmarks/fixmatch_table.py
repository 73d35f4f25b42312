"""FixMatch and its adaptive-threshold successors vs. labels-only training and LabelSpreading (issue 4), and the
methods FixMatch is compared with (Pseudo-Label, Mean Teacher, UDA, MixMatch, Dash; issue 17).

Test-split accuracy (final step, EMA model; no selection on test), mean ± std over seeds. Same labeled split, same
backbone, same number of steps for every row.

    python benchmarks/fixmatch_table.py --dataset digits --labels 4 10 --seeds 0 1 2 --steps 1000 --device cuda
    python benchmarks/fixmatch_table.py --labels 4 --policies --methods mean_teacher ict --set ema_m=0.99

`--set KEY=VALUE` (VALUE read as JSON, else as a string) changes one key of every semi-supervised row's method;
the rows' names say so. `--keep-runs DIR` keeps every run's folder, DIR/<dataset>-<labels>-seed<seed>-<row>, for
its metrics.jsonl (per pass over the unlabeled images: pseudo/mask_rate, pseudo/accuracy and per class) and its
report (the final threshold sweep of pseudo-label quantity and quality).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import label_spreading_on_pixels, mean_std, run_stages, table, usb_small_cnn_keys  # noqa: E402
from ssl_kit.methods import build_method  # noqa: E402


# The compared methods' own keys at this step budget (USB's values; Dash's warm-up and ρ stages scaled to the
# budget); rows that are methods of their own, beside FixMatch's threshold policies
METHOD_KEYS = {
    "pseudo_label": {"threshold": 0.95, "unsup_warmup": 0.4},
    "mean_teacher": {"lambda_u": 50.0, "unsup_warmup": 0.4},
    "uda": {"threshold": 0.8, "temperature": 0.4},
    "mixmatch": {"lambda_u": 75.0, "temperature": 0.5, "mixup_alpha": 0.5, "unsup_warmup": 0.4},
    "dash": {"warmup_steps": 100, "rho_window": 20, "rho_update_every": 10},
    "simmatch": {"threshold": 0.95, "proj_size": 64},
    "adamatch": {"threshold": 0.9},
    "comatch": {},  # USB's defaults (the method's own) at μ 3
    "remixmatch": {},
    "simmatchv2": {},
    # issue 28's further methods, each on its own defaults (USB's values; ramps are fractions of the budget)
    "pi_model": {},
    "vat": {},
    "ict": {},
    "crmatch": {},
    "defixmatch": {},
    "refixmatch": {},
    "sequencematch": {},
    "epass": {},
}
NAMES = {"fixed": "FixMatch", "pseudo_label": "Pseudo-Label", "mean_teacher": "Mean Teacher", "uda": "UDA",
         "mixmatch": "MixMatch", "dash": "Dash", "simmatch": "SimMatch", "adamatch": "AdaMatch",
         "comatch": "CoMatch", "remixmatch": "ReMixMatch", "simmatchv2": "SimMatchV2",
         "pi_model": "Π-model", "vat": "VAT", "ict": "ICT", "crmatch": "CRMatch", "defixmatch": "DeFixMatch",
         "refixmatch": "ReFixMatch", "sequencematch": "SequenceMatch", "epass": "EPASS"}


def stages(dataset: str, labels: int, steps: int, size: int, width: int, policy: str | None, device: str, mu: int,
           batch: int = 40):
    common = {"data": {"dataset": dataset, "image_size": size, "labels_per_class": labels},
              **usb_small_cnn_keys(width, steps, batch, device)}
    if policy is None:
        return [{"name": "run", "method": "supervised", **common}]
    if policy in METHOD_KEYS:  # a method of its own (policy names the method), same budget, same μ
        return [{"name": "run", "method": policy, "mu": mu, **METHOD_KEYS[policy], **common}]
    return [{"name": "run", "method": "fixmatch", "mu": mu, "threshold": 0.95,
             "threshold_policy": {"policy": policy}, **common}]


def parse_overrides(pairs: list[str]) -> dict:
    """['ema_m=0.99', ...] -> {'ema_m': 0.99, ...}; values are JSON where they parse, strings otherwise."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE, e.g. ema_m=0.99")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def with_overrides(stage_list: list[dict], overrides: dict) -> list[dict]:
    """The stages with `overrides` set on the semi-supervised stage (the supervised row is left as it is); a key
    that the stage's method does not have is an error naming it and the method."""
    stage = stage_list[0]
    if not overrides or stage["method"] == "supervised":
        return stage_list
    fields = build_method(stage["method"]).config_class.model_fields
    unknown = sorted(key for key in overrides if key not in fields)
    if unknown:
        raise SystemExit(f"--set {', '.join(unknown)}: not a key of method {stage['method']!r}")
    return [{**stage, **overrides}] + stage_list[1:]


def row_name(policy: str | None, overrides: dict) -> str:
    if policy is None:
        return "supervised only"
    suffix = ", ".join(f"{key}={value}" for key, value in overrides.items())
    return NAMES.get(policy, policy) + (f" ({suffix})" if suffix else "")


def run_folder(dataset: str, labels: int, seed: int, row: str) -> str:
    """A folder name for one run of the table: 'fashion-mnist-4-seed0-pseudo-label' (row names made path-safe)."""
    safe = re.sub(r"[^\w.=]+", "-", row.lower()).strip("-")
    return f"{dataset}-{labels}-seed{seed}-{safe}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--labels", type=int, nargs="+", default=[4, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--policies", nargs="*", default=["fixed", "flexmatch", "freematch", "softmatch"],
                        help="FixMatch threshold policies (a method name here runs that method)")
    parser.add_argument("--methods", nargs="*", default=list(METHOD_KEYS), help="other methods beside FixMatch")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--mu", type=int, default=3)
    parser.add_argument("--batch", type=int, default=40, help="labeled batch size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--label-spreading", action="store_true", help="also LabelSpreading (rbf, gamma 0.25)")
    parser.add_argument("--keep-runs", type=Path, default=None, metavar="DIR",
                        help="keep each run's folder under DIR (default: temporary, removed)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="set these keys of every semi-supervised row's method (e.g. ema_m=0.99)")
    args = parser.parse_args()
    overrides = parse_overrides(args.overrides)
    rows = []
    for labels in args.labels:
        results: dict[str, list[float]] = {}
        for seed in args.seeds:
            for policy in [None] + args.policies + args.methods:
                stage_list = stages(args.dataset, labels, args.steps, args.size, args.width, policy, args.device,
                                    args.mu, args.batch)
                name = row_name(policy, overrides)
                keep_in = None if args.keep_runs is None else args.keep_runs / run_folder(args.dataset, labels, seed,
                                                                                          name)
                summary, _ = run_stages(with_overrides(stage_list, overrides), seed, keep_in)
                results.setdefault(name, []).append(summary["run/test/top1"])
                print(f"labels/class {labels} seed {seed} {name}: {summary['run/test/top1']:.4f}", flush=True)
            if args.label_spreading:
                results.setdefault("LabelSpreading (rbf, γ=0.25)", []).append(
                    label_spreading_on_pixels(args.dataset, labels, seed))
        for name, values in results.items():
            rows.append([args.dataset, labels, name, mean_std(values), len(values)])
    print("\n" + table(["data", "labels/class", "method", "test top1", "seeds"], rows))


if __name__ == "__main__":
    main()
