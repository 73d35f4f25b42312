"""Numerical edge values behave as documented, and broken inputs fail early with a message naming the problem."""
from __future__ import annotations

import pytest
import torch

from ssl_kit.config import validate_recipe
from ssl_kit.data.imageset import ImageSet
from ssl_kit.errors import DataError, TrainingError
from ssl_kit.losses import fixmatch_loss, kd_loss, nt_xent_loss
from ssl_kit.runner import run_recipe
from tests.conftest import tiny_stage


def test_threshold_edges():
    weak = torch.tensor([[10.0, 0.0], [0.1, 0.0]])
    strong = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    loss, mask = fixmatch_loss(weak, strong, threshold=0.0)
    assert mask.tolist() == [1.0, 1.0] and loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    loss, mask = fixmatch_loss(weak, strong, threshold=1.0)  # softmax never reaches exactly 1 here: nothing passes
    assert mask.tolist() == [0.0, 0.0] and loss.item() == 0.0


def test_tiny_temperature_and_extreme_logits_stay_finite():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(8, 4, generator=g, requires_grad=True)
    loss = nt_xent_loss(z1, torch.randn(8, 4, generator=g), temperature=1e-4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z1.grad).all()
    # KL between two opposite one-hot-like distributions at T = 4: (2e4 / 4) · T² = 8e4, finite
    assert kd_loss(torch.tensor([[1e4, -1e4]]), torch.tensor([[-1e4, 1e4]])).item() == pytest.approx(8e4, rel=1e-4)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(z1, z1, temperature=0.0)


def test_fp16_on_cpu_is_refused_with_advice(tmp_path):
    recipe = validate_recipe({"stages": [tiny_stage(train={"precision": "fp16", "device": "cpu"})]})
    with pytest.raises(TrainingError, match="fp16 needs a CUDA device; use bf16"):
        run_recipe(recipe, tmp_path / "run")


def test_dataset_smaller_than_one_batch_is_named(tmp_path):
    stage = tiny_stage(data={"dataset": "digits", "image_size": 16, "labels_per_class": 1}, train={"batch_size": 64})
    with pytest.raises(TrainingError, match="batch_size 64 is larger than the 10 training images"):
        run_recipe(validate_recipe({"stages": [stage]}), tmp_path / "run")
    assert not (tmp_path / "run" / "summary.json").exists()


def test_labels_out_of_range_are_named():
    with pytest.raises(DataError, match="mine: label 3 is out of range for 2 classes"):
        ImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 3]), ["a", "b"], "mine")
