"""Domain transfer with frozen features.

- source -> targets: a linear probe fitted on the source domain (lr/wd chosen on a validation split of the source
  training set) scored on each target's test split, with the gap to the source accuracy and, where the target has
  labeled training images, the target-oracle bound (the same probe fitted on the target itself). No target image is
  seen while fitting (generalisation); `adapt` adds adaptation numbers beside it (see adaptation.py).
- corruptions: the source test split corrupted at severities 1-5 as extra targets.
- leave-one-domain-out (DomainBed): for every domain, fit on the union of the other domains' training splits with
  model selection on their validation split (training-domain validation), score on the held-out domain's test split.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..data.imageset import ImageSet
from ..errors import DataError
from .adaptation import ADAPT_METHODS, adapt_batchnorm
from .corruptions import SEVERITIES, corrupt
from .features import FeatureExtractor, feature_cache_dir
from .linear_probe import linear_probe
from .mapped import concat_features
from ..common.metrics import predict


def scalars(metrics: dict) -> dict:
    """The plain numbers of a metrics dict (drops lists, models and '_' keys)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not k.startswith("_")}


def _check_classes(name: str, classes: Sequence[str], reference_name: str, reference: Sequence[str]) -> None:
    if list(classes) != list(reference):
        raise DataError(f"domain {name!r} has classes {list(classes)[:10]}, {reference_name!r} has "
                        f"{list(reference)[:10]}: transfer needs the same classes in the same order")


def _probe(train: tuple, test: tuple, epochs: int, seed: int, sweep: bool) -> dict:
    """train/test: (features (N, F), labels (N,), classes) -> linear_probe result (with '_model')."""
    return linear_probe(train[0], train[1], test[0], test[1], len(train[2]), epochs, sweep, seed=seed)


def transfer_eval(extractor: FeatureExtractor, source: str, targets: Sequence[str] = (), epochs: int = 100,
                  seed: int = 0, sweep: bool = True, adapt: Sequence[str] = (), oracle: bool = True,
                  corruptions: Sequence[str] = (), severities: Sequence[int] = SEVERITIES,
                  adapted: Optional[dict[str, dict]] = None) -> dict:
    """`adapted`: {target: {"fixmatch_source_only_top1", "fixmatch_adapted_top1"}}, the scores of the adaptation
    stages the runner trained first (adaptation.adaptation_recipe), needed by `adapt=["fixmatch"]`.
    -> {"protocol", "source": {"spec", "top1", ...}, "targets": {name: {"top1", "top5", "gap", ...}}}.
    Target entries may add "oracle_top1", "adabn_top1", "fixmatch_source_only_top1", "fixmatch_adapted_top1";
    corrupted targets are named "<source>+<corruption>@<severity>"."""
    unknown = [a for a in adapt if a not in ADAPT_METHODS]
    if unknown:
        raise DataError(f"unknown adaptation {unknown}; known: {', '.join(ADAPT_METHODS)}")
    missing = [t for t in targets if "fixmatch" in adapt and t not in (adapted or {})]
    if missing:
        raise DataError(f"fixmatch adaptation to {missing} is training: its stages run before the scoring (ssl-kit "
                        f"run / ssl-kit transfer train them) and their scores come in `adapted`")
    source_splits = extractor.dataset_features(source)
    fitted = _probe(source_splits["train"], source_splits["test"], epochs, seed, sweep)
    model = fitted.pop("_model")
    classes = source_splits["train"][2]
    result = {"protocol": "source->targets (frozen features, linear probe; selection on source validation)",
              "source": {"spec": source, **scalars(fitted)}, "targets": {}}

    def score(features: Tensor, labels: Tensor) -> dict:
        metrics = scalars(model.metrics(features, labels, len(classes)))
        metrics["gap"] = result["source"]["top1"] - metrics["top1"]
        return metrics

    for target in targets:
        splits = extractor.dataset_features(target)
        _check_classes(target, splits["test"][2], source, classes)
        metrics = score(*splits["test"][:2])
        if oracle and bool((splits["train"][1] >= 0).all()):
            metrics["oracle_top1"] = _probe(splits["train"], splits["test"], epochs, seed, sweep)["top1"]
        if "adabn" in adapt:
            metrics["adabn_top1"] = _adabn_top1(extractor, target, model, len(classes))
        if "fixmatch" in adapt:
            metrics.update(adapted[target])
        result["targets"][target] = metrics

    if corruptions:
        clean = extractor.dataset_splits(source)["test"]
        for name in corruptions:
            for severity in severities:
                images = ImageSet(corrupt(clean.images, name, severity, seed), clean.labels, clean.classes,
                                  f"{source}+{name}@{severity}")
                result["targets"][f"{source}+{name}@{severity}"] = score(extractor.features(images), clean.labels)
        result["corruption_mean_top1"] = {
            name: sum(result["targets"][f"{source}+{name}@{s}"]["top1"] for s in severities) / len(severities)
            for name in corruptions}
    return result


def _adabn_top1(extractor: FeatureExtractor, target: str, model, num_classes: int) -> float:
    """Target test accuracy of the source probe on features from a backbone whose BatchNorm statistics were
    re-estimated on the target's training images."""
    splits = extractor.dataset_splits(target)
    adapted = adapt_batchnorm(extractor.backbone, splits["train"].images, extractor.normalize, extractor.device)
    features = predict(adapted, splits["test"].images, extractor.normalize, extractor.device)
    return model.metrics(features, splits["test"].labels, num_classes)["top1"]


def lodo_rows(lodo: dict) -> list[tuple[str, dict]]:
    """(domain, row) pairs of a leave_one_domain_out result, its average last as ('average', ...)."""
    return list(lodo["domains"].items()) + [("average", lodo["average"])]


def leave_one_domain_out(extractor: FeatureExtractor, domains: Sequence[str], epochs: int = 100, seed: int = 0,
                         sweep: bool = True) -> dict:
    """DomainBed-style table over `domains` (≥ 3). -> {"protocol", "domains": {d: {"top1", "oracle_top1", ...}},
    "average": {"top1", "oracle_top1"}}. The probe for held-out d never sees d: its lr/wd are chosen on a validation
    split of the other domains' pooled training features."""
    if len(domains) < 3 or len(set(domains)) != len(domains):
        raise DataError(f"leave-one-domain-out needs at least 3 different domains, got {list(domains)}")
    features = {d: extractor.dataset_features(d) for d in domains}
    reference = features[domains[0]]["train"][2]
    for domain in domains[1:]:
        _check_classes(domain, features[domain]["train"][2], domains[0], reference)
    table = {}
    for held in domains:
        others = [features[d]["train"] for d in domains if d != held]
        pooled = (concat_features([o[0] for o in others], feature_cache_dir()), torch.cat([o[1] for o in others]),
                  reference)  # streamed domains: pooled on disk, never in memory
        fitted = scalars(_probe(pooled, features[held]["test"], epochs, seed, sweep))
        oracle = _probe(features[held]["train"], features[held]["test"], epochs, seed, sweep)["top1"]
        table[held] = {"top1": fitted["top1"], "balanced_accuracy": fitted["balanced_accuracy"],
                       "train_domains_val_top1": fitted.get("val_top1"), "oracle_top1": oracle,
                       "train_size": fitted["train_size"]}
    average = {key: sum(row[key] for row in table.values()) / len(table) for key in ("top1", "oracle_top1")}
    return {"protocol": "leave-one-domain-out (frozen features, linear probe; training-domain validation)",
            "domains": table, "average": average}
