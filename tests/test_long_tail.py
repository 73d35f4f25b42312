"""Long-tailed splits (data.long_tail: the DARP/DASO/ACR protocol) and the metrics of imbalanced data (balanced
accuracy, minority-class recall) in the run's summary and report."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_stage
from ssl_kit.common.metrics import minority_recall
from ssl_kit.config import validate_recipe
from ssl_kit.data.needs import DataNeeds
from ssl_kit.data.pipeline import prepare_data
from ssl_kit.data.splits import long_tail_counts
from ssl_kit.errors import ConfigError, DataError
from ssl_kit.runner import run_recipe


def _data_config(**data):
    stage = tiny_stage("s", "fixmatch", data={"dataset": "digits", "image_size": 8, **data})
    return validate_recipe({"seed": 0, "name": "t", "stages": [stage]}).stages[0].data


def _counts(labels: torch.Tensor) -> list[int]:
    return torch.bincount(labels, minlength=10).tolist()


def test_counts_follow_the_exponential_profile():
    assert long_tail_counts(100, 100.0, 10) == [100, 59, 35, 21, 12, 7, 4, 2, 1, 1]  # ⌊100 · 100^(−k/9)⌋, ≥ 1
    assert long_tail_counts(100, 100.0, 10, reverse=True) == [1, 1, 2, 4, 7, 12, 21, 35, 59, 100]
    assert long_tail_counts(30, 1.0, 4) == [30, 30, 30, 30]
    assert long_tail_counts(50, 10.0, 2) == [50, 5]


@pytest.mark.parametrize("distribution,expected", [
    ("consistent", long_tail_counts(60, 5.0, 10)),
    ("uniform", [60] * 10),
    ("reversed", long_tail_counts(60, 5.0, 10, reverse=True)),
])
def test_labeled_and_unlabeled_splits_are_long_tailed_and_disjoint(distribution, expected):
    cfg = _data_config(labels_per_class=30, long_tail={"ratio": 10, "unlabeled_ratio": 5, "unlabeled_per_class": 60,
                                                       "unlabeled_distribution": distribution})
    data = prepare_data(cfg, 0, DataNeeds(unlabeled=True, unlabeled_ratio=2))
    labels = data.train.labels
    assert _counts(labels[data.labeled]) == long_tail_counts(30, 10.0, 10)
    assert _counts(labels[data.unlabeled]) == expected
    assert not set(data.labeled.tolist()) & set(data.unlabeled.tolist())
    again = prepare_data(cfg, 0, DataNeeds(unlabeled=True, unlabeled_ratio=2))
    assert torch.equal(again.labeled, data.labeled) and torch.equal(again.unlabeled, data.unlabeled)
    other = prepare_data(cfg, 1, DataNeeds(unlabeled=True, unlabeled_ratio=2))
    assert not torch.equal(other.labeled, data.labeled)  # the split follows the seed


def test_default_pool_is_the_largest_the_data_allows():
    cfg = _data_config(labels_per_class=20, long_tail={"ratio": 10})
    data = prepare_data(cfg, 0, DataNeeds(unlabeled=True, unlabeled_ratio=2))
    pool = _counts(data.train.labels[data.unlabeled])
    left = [a - b for a, b in zip(_counts(data.train.labels), _counts(data.train.labels[data.labeled]))]
    assert pool[0] == max(pool) and pool[-1] == min(pool)
    assert all(p <= n for p, n in zip(pool, left))
    assert any(p == n for p, n in zip(pool, left))  # one class is exhausted: the head could not be larger by much
    assert pool == long_tail_counts(pool[0], 10.0, 10)


def test_bad_long_tail_settings_are_named():
    with pytest.raises(ConfigError, match="labels_per_class"):
        _data_config(long_tail={"ratio": 10})
    with pytest.raises(ConfigError, match="ratio"):
        _data_config(labels_per_class=5, long_tail={"ratio": 0.5})
    with pytest.raises(DataError, match="asks 10000 images of class"):
        prepare_data(_data_config(labels_per_class=10000, long_tail={"ratio": 2}), 0, DataNeeds())


def test_minority_recall_is_the_mean_recall_of_the_fewest_labeled_classes():
    per_class = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    counts = torch.tensor([50, 40, 30, 20, 10, 9, 8, 7, 6, 5])  # minority: the 3 fewest -> classes 7, 8, 9
    assert minority_recall(per_class, counts) == pytest.approx((0.2 + 0.1 + 0.0) / 3)
    assert minority_recall(per_class, torch.full((10,), 4)) is None  # balanced: no minority
    with_absent = per_class[:9] + [None]
    assert minority_recall(with_absent, counts) == pytest.approx(0.15)


def test_a_long_tailed_run_reports_balanced_accuracy_and_minority_recall(tmp_path):
    stage = tiny_stage("lt", "fixmatch", data={"dataset": "digits", "image_size": 16, "labels_per_class": 20,
                                               "long_tail": {"ratio": 10}},
                       train={"steps": 4, "batch_size": 16}, mu=2)
    run_dir, summary = run_recipe(validate_recipe({"seed": 0, "name": "lt", "stages": [stage]}), tmp_path / "r")
    details = json.loads((run_dir / "stages" / "lt" / "eval.json").read_text())
    assert details["labeled_counts"] == long_tail_counts(20, 10.0, 10)
    expected = minority_recall(details["per_class"], torch.tensor(details["labeled_counts"]))
    assert summary["lt/test/minority_recall"] == pytest.approx(expected)
    assert 0 <= summary["lt/test/balanced_accuracy"] <= 1
    report = (run_dir / "report.md").read_text()
    assert "minority_recall" in report and "| labeled training images |" in report
