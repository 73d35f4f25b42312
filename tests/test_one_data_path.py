"""Training and evaluation read a source the same way: one holdout policy (data/holdout.py), and evaluation uses the
data settings the backbone was trained with (data.eval_resize_ratio recorded in backbone.pt, the recipe's
data.memory_budget_gb for an evaluation stage, --budget-gb on the command line)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_kit.cli import main as cli_main
from ssl_kit.config import DataConfig, validate_recipe
from ssl_kit.data.decode import decode_eval
from ssl_kit.data.holdout import split_positions
from ssl_kit.data.imageset import ImageSet
from ssl_kit.data.pipeline import prepare_data
from ssl_kit.data.specs import load_splits, open_index, parse_spec
from ssl_kit.engine.checkpoint import validate_record
from ssl_kit.errors import CheckpointError, DataError
from ssl_kit.eval.features import FeatureExtractor
from ssl_kit.models.registry import build_backbone
from ssl_kit.runner import run_recipe
from tests.conftest import tiny_stage


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_KIT_CACHE", str(tmp_path / "cache"))


def partly_labeled_list(root: Path, count: int = 40, labeled_every: int = 2) -> Path:
    """filelist:FILE of `count` JPEGs of varied size; every `labeled_every`-th row has a class ('a'/'b'), the
    others an empty label (unlabeled). The class is the dominant colour channel."""
    rows = []
    rng = np.random.default_rng(0)
    for i in range(count):
        array = rng.integers(0, 100, (20 + i % 7, 24 + i % 5, 3), dtype=np.uint8)
        array[:, :, i % 2] += 150
        path = root / f"img{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path, quality=92)
        rows.append(f"{path.name},{'ab'[i % 2] if (i // 2) % labeled_every == 0 else ''}")
    listing = root / "list.csv"
    listing.write_text("\n".join(rows) + "\n")
    return listing


def test_training_and_every_evaluation_path_hold_out_the_same_images(tmp_path):
    listing = partly_labeled_list(tmp_path / "pool")
    spec = f"filelist:{listing}"
    index = open_index(parse_spec(spec))
    train_pos, test_pos = split_positions(index, 0.2, 0)
    # the policy: unlabeled images all train, a fifth of each class of the labeled ones held out
    assert (index.labels[train_pos] < 0).sum() == (index.labels < 0).sum() == 20
    assert (index.labels[test_pos] >= 0).all() and np.bincount(index.labels[test_pos]).tolist() == [2, 2]
    assert not set(train_pos.tolist()) & set(test_pos.tolist())

    trained = prepare_data(DataConfig(dataset=spec, image_size=16, workers=0, storage="memory", normalize="none"),
                           0)
    in_memory = load_splits(spec, folder_size=16)
    assert torch.equal(trained.test.images, in_memory["test"].images)
    assert torch.equal(trained.test.labels, in_memory["test"].labels)
    assert torch.equal(trained.train.images, in_memory["train"].images)

    backbone = build_backbone("small_cnn", 3, 16, {"width": 8}).eval()
    backbone.data_info = {"image_size": 16, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    extractor = FeatureExtractor(backbone, "cpu", workers=0)
    memory = extractor.dataset_features(spec)
    streamed = extractor.dataset_features(spec + ",storage=stream")
    for split, expected in (("train", 16), ("test", 4)):  # the labeled images of each split, on both paths
        assert memory[split][0].shape[0] == streamed[split][0].shape[0] == expected
        assert torch.equal(memory[split][1], streamed[split][1])
    assert torch.equal(memory["test"][1], trained.test.labels)


def test_evaluation_decodes_a_folder_exactly_as_training_did_for_a_grayscale_backbone(tmp_path):
    """data/opened.py: training and evaluation open a spec through one function, so a 1-channel backbone trained on
    colour JPEGs is scored on its test split decoded exactly as training decoded it. Before, evaluation decoded RGB
    and converted with its own luma weights: 261 of the 1,024 test pixels differed here (by one grey level)."""
    spec = f"filelist:{partly_labeled_list(tmp_path / 'pool')}"
    trained = prepare_data(DataConfig(dataset=spec, image_size=16, channels=1, workers=0, storage="memory",
                                      normalize="none"), 0)
    backbone = build_backbone("small_cnn", 1, 16, {"width": 8}).eval()
    backbone.data_info = {"image_size": 16, "channels": 1, "mean": [0.5], "std": [0.25]}
    evaluated = FeatureExtractor(backbone, "cpu", workers=0).dataset_splits(spec)
    assert trained.test.images.shape == evaluated["test"].images.shape == (4, 1, 16, 16)
    assert torch.equal(trained.test.images, evaluated["test"].images)
    assert torch.equal(trained.train.images, evaluated["train"].images)


def test_a_source_without_labels_trains_label_free_and_evaluation_says_it_has_nothing_to_score(tmp_path):
    for i in range(12):
        Image.fromarray(np.full((18, 22, 3), 20 * i, np.uint8)).save(tmp_path / f"{i}.png")
    spec = f"images:{tmp_path}"
    splits = load_splits(spec, folder_size=16)
    assert len(splits["train"]) == 12 and len(splits["test"]) == 0  # nothing held out that could not be scored
    backbone = build_backbone("small_cnn", 3, 16, {"width": 8}).eval()
    backbone.data_info = {"image_size": 16, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    for variant in (spec, spec + ",storage=stream"):
        with pytest.raises(DataError, match=r"split 'train' has no labeled images .*labels=labels.csv"):
            FeatureExtractor(backbone, "cpu", workers=0).dataset_features(variant)


def test_streamed_evaluation_uses_the_resize_ratio_the_backbone_was_trained_with(tmp_path):
    listing = partly_labeled_list(tmp_path / "pool", count=12, labeled_every=1)
    spec = f"filelist:{listing},storage=stream"
    backbone = build_backbone("small_cnn", 3, 16, {"width": 8}).eval()
    backbone.data_info = {"image_size": 16, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3,
                          "eval_resize_ratio": 0.5}
    extractor = FeatureExtractor(backbone, "cpu", workers=0)
    feats = extractor.dataset_features(spec)["test"][0].float()
    index = open_index(parse_spec(spec))
    _, test = split_positions(index, 0.2, 0)

    def by_hand(ratio: float) -> torch.Tensor:
        crops = np.stack([decode_eval(index.read(p), index.path(p), 16, 3, ratio) for p in test])
        return extractor.features(ImageSet(torch.from_numpy(crops), torch.from_numpy(index.labels[test]),
                                           index.classes))

    assert torch.allclose(feats, by_hand(0.5), rtol=5e-3, atol=1e-5)
    assert not torch.allclose(feats, by_hand(0.875), rtol=5e-3, atol=1e-5)


def test_a_record_with_a_bad_resize_ratio_is_refused():
    record = {"arch": "small_cnn", "kwargs": {"width": 8}, "state_dict": {},
              "data": {"image_size": 16, "channels": 3, "eval_resize_ratio": 2.0}}
    with pytest.raises(CheckpointError, match=r"data.eval_resize_ratio is 2.0, expected a number in \(0, 1\]"):
        validate_record(record, "backbone.pt")


def test_an_evaluation_stage_evaluates_with_its_training_stages_data_settings(tmp_path, capsys):
    folder = tmp_path / "classes"
    for c, name in enumerate(("a", "b")):
        for i in range(10):
            array = np.random.default_rng(10 * c + i).integers(0, 100, (24, 30, 3), dtype=np.uint8)
            array[:, :, c] += 150
            (folder / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(folder / name / f"{i}.jpg")
    # a budget far below the set: the training stage streams, so its knn stage must stream (on-disk feature cache)
    data = {"dataset": f"imagefolder:{folder}", "image_size": 16, "workers": 0, "memory_budget_gb": 1e-6,
            "eval_resize_ratio": 0.75}
    recipe = validate_recipe({"name": "t", "seed": 0, "stages": [
        tiny_stage(data=data, train={"steps": 4, "batch_size": 8}),
        {"name": "knn", "method": "knn", "k": 3, "device": "cpu"}]})
    _, summary = run_recipe(recipe, tmp_path / "run")
    assert 0.0 <= summary["knn/top1"] <= 1.0
    record = torch.load(tmp_path / "run" / "stages" / "supervised" / "backbone.pt", weights_only=True)
    assert record["data"]["eval_resize_ratio"] == 0.75
    assert len(list((tmp_path / "cache" / "features").glob("*.f16.npy"))) == 2  # train + test, streamed

    # the command line: the default budget holds this set in memory (no new cache files); a tiny one streams it
    for budget, files in ((None, 2), ("1e-9", 4)):
        args = ["knn", "--checkpoint", str(tmp_path / "run"), "--data", f"imagefolder:{folder}", "--device", "cpu",
                "--json"] + (["--budget-gb", budget] if budget else [])
        assert cli_main(args) == 0
        assert len(list((tmp_path / "cache" / "features").glob("*.f16.npy"))) == files
    assert cli_main(["knn", "--checkpoint", str(tmp_path / "run"), "--data", "digits", "--budget-gb", "0"]) == 2
    assert "argument --budget-gb: 0 is outside (0, 1e+06]" in capsys.readouterr().err
