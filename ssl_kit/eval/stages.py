"""Evaluation stages of a recipe (linear_probe, knn, transfer) -> flat metrics for summary.json."""
from __future__ import annotations

import json
from pathlib import Path

from .features import FeatureExtractor
from .knn import knn_classify
from .linear_probe import linear_probe
from .transfer import _scalars, transfer_eval


def probe_dataset(extractor: FeatureExtractor, spec: str, epochs: int, labels_per_class=None, seed: int = 0,
                  sweep: bool = True) -> dict:
    splits = extractor.dataset_features(spec)
    train_x, train_y, classes = splits["train"]
    test_x, test_y, _ = splits["test"]
    result = linear_probe(train_x, train_y, test_x, test_y, len(classes), epochs, sweep, labels_per_class, seed)
    result.pop("_model")
    return result


def knn_dataset(extractor: FeatureExtractor, spec: str, k: int, temperature: float, ivf: bool = False) -> dict:
    splits = extractor.dataset_features(spec)
    train_x, train_y, classes = splits["train"]
    test_x, test_y, _ = splits["test"]
    return knn_classify(train_x, train_y, test_x, test_y, len(classes), k, temperature, ivf)


def run_eval_stage(stage, checkpoint, dataset: str, run_dir: Path, seed: int) -> dict:
    extractor = FeatureExtractor.from_checkpoint(checkpoint, stage.device)
    if stage.method == "linear_probe":
        result = probe_dataset(extractor, dataset, stage.epochs, stage.labels_per_class, seed,
                               sweep=stage.labels_per_class is None or stage.labels_per_class >= 2)
    elif stage.method == "knn":
        result = knn_dataset(extractor, dataset, stage.k, stage.knn_temperature)
    else:
        full = transfer_eval(extractor, dataset, stage.targets, stage.epochs, seed)
        out_dir = run_dir / "stages" / stage.name
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "transfer.json").write_text(json.dumps(full, indent=2))
        flat = {f"source/{k}": v for k, v in full["source"].items() if k != "spec"}
        for target, metrics in full["targets"].items():
            flat.update({f"{target}/{k}": v for k, v in metrics.items()})
        return flat
    out_dir = run_dir / "stages" / stage.name
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps({k: v for k, v in result.items()}, default=str))
    return _scalars(result)
