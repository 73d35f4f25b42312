"""Evaluation stages of a recipe (linear_probe, attentive_probe, knn, transfer) -> flat metrics for summary.json,
details in stages/<name>/, pictures in plots/."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..common import plots
from .attentive_probe import attentive_probe
from .features import DEFAULT_MEMORY_BUDGET_GB, FeatureExtractor
from .knn import knn_classify
from .linear_probe import linear_probe
from .transfer import leave_one_domain_out, lodo_rows, scalars, transfer_eval


def probe_dataset(extractor: FeatureExtractor, spec: str, epochs: int, labels_per_class=None, seed: int = 0,
                  sweep: bool = True, augment: bool = False) -> dict:
    """Linear probe on `spec`; with `augment`, the final fit sees freshly augmented training images every epoch."""
    splits = extractor.dataset_features(spec)
    train_x, train_y, classes = splits["train"]
    test_x, test_y, _ = splits["test"]
    augmented = None
    if augment:
        train_images = extractor.dataset_splits(spec)["train"]
        train_images = train_images.subset((train_images.labels >= 0).nonzero().squeeze(1))  # the rows of train_x
        augmented = lambda epoch, index: extractor.augmented_features(  # noqa: E731
            train_images.subset(index), seed=seed * 100003 + epoch)
    result = linear_probe(train_x, train_y, test_x, test_y, len(classes), epochs, sweep, labels_per_class, seed,
                          augmented)
    result.pop("_model")
    result["augmented"] = int(augment)
    return result


def attentive_probe_dataset(extractor: FeatureExtractor, spec: str, epochs: int, labels_per_class=None,
                            seed: int = 0, sweep: bool = True, batch_size: int = 128) -> dict:
    """Attentive probe on the patch tokens of `spec`'s labeled train and test images."""
    splits = extractor.token_features(spec)
    train_x, train_y, classes = splits["train"]
    test_x, test_y, _ = splits["test"]
    return attentive_probe(train_x, train_y, test_x, test_y, len(classes), extractor.backbone.num_features, epochs,
                           sweep, labels_per_class, seed, batch_size, extractor.device)


def knn_dataset(extractor: FeatureExtractor, spec: str, k: int, temperature: float, ivf: bool = False) -> dict:
    splits = extractor.dataset_features(spec)
    train_x, train_y, classes = splits["train"]
    test_x, test_y, _ = splits["test"]
    return knn_classify(train_x, train_y, test_x, test_y, len(classes), k, temperature, ivf)


def tsne_picture(extractor: FeatureExtractor, specs: Sequence[str], out: Path, per_domain: int = 300,
                 seed: int = 0) -> Path:
    """t-SNE of up to `per_domain` test images of each spec, coloured by class (and by domain when > 1 spec)."""
    generator = torch.Generator().manual_seed(seed)
    features, labels, domains = [], [], []
    classes: list[str] = []
    for index, spec in enumerate(specs):
        x, y, classes = extractor.dataset_features(spec)["test"]
        chosen = torch.randperm(x.shape[0], generator=generator)[:per_domain]
        features.append(x[chosen].float())  # a few rows, also of a mapped float16 cache
        labels += y[chosen].tolist()
        domains += [index] * len(chosen)
    points = plots.tsne_embedding(torch.cat(features).numpy(), seed)
    many = len(specs) > 1
    return plots.plot_tsne(points, labels, list(classes), out, domains if many else None,
                           list(specs) if many else None)


def flatten_transfer(full: dict, lodo: dict | None) -> dict:
    """transfer.json (+ leave-one-domain-out) -> flat summary keys: source/top1, <target>/top1, <target>/gap, ...,
    corruption_mean/<name>/top1, lodo/<domain>/top1, lodo/average/top1."""
    flat = {}
    if full:
        flat.update({f"source/{k}": v for k, v in full["source"].items() if k != "spec"})
        for target, metrics in full["targets"].items():
            flat.update({f"{target}/{k}": v for k, v in metrics.items()})
        for name, value in full.get("corruption_mean_top1", {}).items():
            flat[f"corruption_mean/{name}/top1"] = value
    if lodo:
        for domain, row in lodo_rows(lodo):
            flat.update({f"lodo/{domain}/{k}": v for k, v in row.items() if isinstance(v, (int, float))})
    return flat


def domain_bar_rows(full: dict) -> dict[str, dict[str, float]]:
    """transfer.json -> {domain: {series: top1}} for plots.plot_domain_bars (plain targets, no corruptions)."""
    series = {"top1": "source probe", "oracle_top1": "target oracle", "adabn_top1": "AdaBN",
              "fixmatch_source_only_top1": "fine-tune on source", "fixmatch_adapted_top1": "FixMatch adaptation"}
    rows = {f"{full['source']['spec']} (source)": {"source probe": full["source"]["top1"]}}
    for target, metrics in full["targets"].items():
        if "+" not in target:
            rows[target] = {label: metrics[key] for key, label in series.items() if key in metrics}
    return rows


def _transfer(stage, extractor: FeatureExtractor, dataset: Optional[str], run_dir: Optional[Path], seed: int,
              adapted: Optional[dict[str, dict]]) -> dict:
    """-> transfer.json's content, plus "leave_one_domain_out" when the stage names domains."""
    result: dict = {}
    if stage.targets or stage.corruptions:
        result = transfer_eval(extractor, dataset, stage.targets, stage.epochs, seed, stage.sweep, adapt=stage.adapt,
                               oracle=stage.oracle, corruptions=stage.corruptions, severities=stage.severities,
                               adapted=adapted)
        if run_dir is not None and stage.targets:
            plots.plot_domain_bars(domain_bar_rows(result), run_dir / "plots" / f"domains_{stage.name}.png",
                                   f"{stage.name}: top-1 per domain")
            if stage.tsne:
                tsne_picture(extractor, [dataset, *stage.targets], run_dir / "plots" / f"tsne_{stage.name}.png",
                             seed=seed)
    if stage.domains:
        lodo = leave_one_domain_out(extractor, stage.domains, stage.epochs, seed, sweep=stage.sweep)
        result["leave_one_domain_out"] = lodo
        if run_dir is not None and not stage.targets:
            rows = {d: {"leave-one-out": r["top1"], "target oracle": r["oracle_top1"]}
                    for d, r in lodo["domains"].items()}
            plots.plot_domain_bars(rows, run_dir / "plots" / f"domains_{stage.name}.png",
                                   f"{stage.name}: leave-one-domain-out")
    return result


def run_eval_stage(stage, checkpoint, dataset: Optional[str], run_dir: Optional[Path], seed: int,
                   adapted: Optional[dict[str, dict]] = None) -> dict:
    """Score `checkpoint` with a validated linear_probe / attentive_probe / knn / transfer stage -> its full result
    (what the command line prints with --json; `stage_metrics` flattens it for summary.json). With a `run_dir`, the
    result goes to stages/<name>/ and its pictures to plots/. `adapted`: transfer's FixMatch adaptation scores, from
    the training stages the runner ran first. Nothing here trains the backbone."""
    extractor = FeatureExtractor.from_checkpoint(checkpoint, stage.device, stage.weights, stage.image_size,
                                                 stage.memory_budget_gb or DEFAULT_MEMORY_BUDGET_GB,
                                                 stage.n_last_blocks, stage.avgpool)
    if stage.method == "transfer":
        result = _transfer(stage, extractor, dataset, run_dir, seed, adapted)
    elif stage.method == "linear_probe":
        result = probe_dataset(extractor, dataset, stage.epochs, stage.labels_per_class, seed, sweep=stage.sweeps(),
                               augment=stage.augment)
        if stage.tsne and run_dir is not None:
            tsne_picture(extractor, [dataset], run_dir / "plots" / f"tsne_{stage.name}.png", seed=seed)
    elif stage.method == "attentive_probe":
        result = attentive_probe_dataset(extractor, dataset, stage.epochs, stage.labels_per_class, seed,
                                         sweep=stage.sweeps(), batch_size=stage.batch_size)
    else:
        result = knn_dataset(extractor, dataset, stage.k, stage.knn_temperature, stage.ivf)
    if run_dir is not None:
        out_dir = run_dir / "stages" / stage.name
        out_dir.mkdir(parents=True, exist_ok=True)
        if stage.method == "transfer":
            full, lodo = _transfer_parts(result)
            if full:
                (out_dir / "transfer.json").write_text(json.dumps(full, indent=2))
            if lodo is not None:
                (out_dir / "leave_one_domain_out.json").write_text(json.dumps(lodo, indent=2))
        else:
            (out_dir / "eval.json").write_text(json.dumps(result, default=str))
    return result


def stage_metrics(stage, result: dict) -> dict:
    """A run_eval_stage result -> the flat scalars summary.json keeps under the stage's name."""
    if stage.method == "transfer":
        return flatten_transfer(*_transfer_parts(result))
    return scalars(result)


def _transfer_parts(result: dict) -> tuple[dict, Optional[dict]]:
    """A transfer result -> (transfer.json's content, {} without targets or corruptions; the leave-one-domain-out
    table or None)."""
    return {k: v for k, v in result.items() if k != "leave_one_domain_out"}, result.get("leave_one_domain_out")
