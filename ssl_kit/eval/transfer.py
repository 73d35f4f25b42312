"""Domain transfer: fit a linear probe on the source domain's features, report accuracy on every target domain
(no target image is seen while fitting: domain generalisation), with the gap to the source accuracy."""
from __future__ import annotations

from ..errors import DataError
from .features import FeatureExtractor
from .linear_probe import linear_probe


def transfer_eval(extractor: FeatureExtractor, source: str, targets: list[str], epochs: int = 100, seed: int = 0,
                  sweep: bool = True) -> dict:
    """-> {"source": {"spec", "top1", ...}, "targets": {spec: {"top1", "top5", "gap"}}}."""
    source_splits = extractor.dataset_features(source)
    train_x, train_y, classes = source_splits["train"]
    test_x, test_y, _ = source_splits["test"]
    fitted = linear_probe(train_x, train_y, test_x, test_y, len(classes), epochs, sweep, seed=seed)
    model = fitted.pop("_model")
    result = {"source": {"spec": source, **_scalars(fitted)}, "targets": {}}
    from .metrics import classification_metrics

    for target in targets:
        splits = extractor.dataset_features(target)
        features, labels, target_classes = splits["test"]
        if list(target_classes) != list(classes):
            raise DataError(f"target {target!r} has classes {list(target_classes)[:10]}, the source {source!r} has "
                            f"{list(classes)[:10]}: transfer needs the same classes in the same order")
        metrics = _scalars(classification_metrics(model.logits(features), labels, len(classes)))
        metrics["gap"] = result["source"]["top1"] - metrics["top1"]
        result["targets"][target] = metrics
    return result


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not k.startswith("_")}
