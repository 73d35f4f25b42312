"""Semi-supervised learning on long-tailed data: supervised-only, FixMatch and the imbalance methods (DebiasPL, ACR,
ABC, DARP, CReST+) on a long-tailed split (`data.long_tail`, the DARP/DASO/ACR protocol), with a consistent and a mismatched
(reversed) unlabeled class distribution.

Test-split top-1, balanced accuracy and minority-class recall (the 30% classes with the fewest labeled images), final
step, EMA model, no selection on test; mean ± std over seeds. Same split, backbone and step budget for every row.

    python benchmarks/imbalanced_table.py --dataset fashion-mnist --head 150 --ratios 10 100 --seeds 0 1 2 --steps 1000
    python benchmarks/imbalanced_table.py --dataset digits --head 40 --ratios 10 --seeds 0 1 --steps 300   # CPU
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import mean_std, run_stages, table, usb_small_cnn_keys  # noqa: E402

METHODS = ["supervised", "fixmatch", "debiaspl", "acr", "abc", "darp", "crest"]
NAMES = {"supervised": "supervised only", "fixmatch": "FixMatch", "debiaspl": "DebiasPL", "acr": "ACR", "abc": "ABC",
         "darp": "DARP", "crest": "CReST+"}
METRICS = (("test/top1", "top-1"), ("test/balanced_accuracy", "balanced acc."), ("test/minority_recall",
                                                                                  "minority recall"))


def stage(method: str, dataset: str, head: int, ratio: float, distribution: str, steps: int, size: int, width: int,
          mu: int, batch: int, device: str) -> dict:
    """One training stage of `method` on the long-tailed split; every method on USB's SGD setting."""
    data = {"dataset": dataset, "image_size": size, "labels_per_class": head,
            "long_tail": {"ratio": ratio, "unlabeled_distribution": distribution}}
    common = {"name": "run", "method": method, "data": data, **usb_small_cnn_keys(width, steps, batch, device)}
    return common if method == "supervised" else {**common, "mu": mu}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--head", type=int, default=40, help="labeled images of the head class (labels_per_class)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[10.0], help="imbalance ratios γ (labeled = "
                                                                                "unlabeled)")
    parser.add_argument("--distributions", nargs="+", default=["consistent", "reversed"])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--mu", type=int, default=2, help="USB's imbalanced configs: uratio 2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rows = []
    for ratio in args.ratios:
        for distribution in args.distributions:
            results: dict[str, dict[str, list[float]]] = {}
            for seed in args.seeds:
                for method in args.methods:
                    summary, _ = run_stages([stage(method, args.dataset, args.head, ratio, distribution, args.steps,
                                                   args.size, args.width, args.mu, args.batch, args.device)], seed)
                    row = results.setdefault(method, {})
                    for key, _ in METRICS:
                        row.setdefault(key, []).append(summary.get(f"run/{key}", float("nan")))
                    print(f"γ {ratio:g} {distribution} seed {seed} {method}: "
                          + ", ".join(f"{label} {summary.get(f'run/{key}', float('nan')):.4f}"
                                      for key, label in METRICS), flush=True)
            for method, row in results.items():
                rows.append([args.dataset, f"{ratio:g}", distribution, NAMES.get(method, method),
                             *(mean_std(row[key]) for key, _ in METRICS), len(args.seeds)])
    print("\n" + table(["data", "γ", "unlabeled", "method", *(label for _, label in METRICS), "seeds"], rows))


if __name__ == "__main__":
    main()
