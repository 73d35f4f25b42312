"""Short real runs on digits: each method must beat its baseline, not just run."""
import json

import pytest
import torch

from ssl_kit.config import validate_recipe
from ssl_kit.engine.checkpoint import build_from_record, resolve_checkpoint
from ssl_kit.eval.features import FeatureExtractor
from ssl_kit.eval.stages import probe_dataset
from ssl_kit.models.registry import build_backbone
from ssl_kit.runner import run_recipe
from tests.conftest import tiny_stage


def contrastive_stage(method, epochs):
    queue = {"queue_size": 512} if method == "mocov2" else {}  # each method's config holds only its own keys
    return tiny_stage("pretrain", method, temperature=0.5, proj_hidden_dim=64, proj_dim=32, **queue,
                      backbone={"name": "small_cnn", "kwargs": {"width": 16}},
                      views={"crop_scale": [0.4, 1.0], "grayscale_prob": 0.0},
                      optimizer={"name": "lars", "lr": 0.3, "lr_scaling": "linear", "weight_decay": 1e-5},
                      schedule={"name": "cosine", "warmup_epochs": 2},
                      train={"steps": None, "epochs": epochs, "batch_size": 256, "log_every": 5})


@pytest.mark.slow
def test_simclr_backbone_beats_random_init_on_linear_probe(tmp_path):
    recipe = validate_recipe({"seed": 0, "name": "s", "stages": [contrastive_stage("simclr", 25)]})
    run_dir, summary = run_recipe(recipe, tmp_path / "run")
    record = resolve_checkpoint(run_dir)
    pretrained = probe_dataset(FeatureExtractor(build_from_record(record), "cpu"), "digits", 50, 10)["top1"]
    torch.manual_seed(0)
    random = build_backbone("small_cnn", 1, 16, {"width": 16})
    random.data_info = record["data"]
    baseline = probe_dataset(FeatureExtractor(random, "cpu"), "digits", 50, 10)["top1"]
    assert pretrained > baseline + 0.03, (pretrained, baseline)
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("online_probe/train_top1" in r for r in epochs if r.get("kind") == "epoch")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mocov2", "mocov3"])
def test_moco_variants_train(tmp_path, method):
    recipe = validate_recipe({"seed": 0, "name": "m", "stages": [contrastive_stage(method, 3)]})
    run_dir, _ = run_recipe(recipe, tmp_path / "run")
    losses = [json.loads(line)["contrastive_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"kind": "step"' in line]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_fixmatch_beats_its_supervised_counterpart(tmp_path):
    common = dict(data={"dataset": "digits", "image_size": 16, "labels_per_class": 4},
                  backbone={"name": "small_cnn", "kwargs": {"width": 16}},
                  optimizer={"name": "sgd", "lr": 0.03, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
                  schedule={"name": "fixmatch_cosine"},
                  train={"steps": 250, "batch_size": 40, "ema_decay": 0.95, "log_every": 25,
                         "checkpoint_every_steps": 1000})
    stages = [tiny_stage("supervised", "supervised", **common),
              tiny_stage("fixmatch", "fixmatch", mu=3, threshold=0.9, **common)]
    run_dir, summary = run_recipe(validate_recipe({"seed": 0, "name": "f", "stages": stages}), tmp_path / "run")
    assert summary["fixmatch/test/top1"] > summary["supervised/test/top1"] + 0.03, summary
    assert (run_dir / "plots" / "threshold_sweep_fixmatch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0 < summary["fixmatch/sweep/quantity@0.5"] <= 1
    assert summary["fixmatch/sweep/quantity@0.99"] <= summary["fixmatch/sweep/quantity@0.5"]
    assert "pseudo_labels_fixmatch.png" in (run_dir / "report.md").read_text()
