import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(2)


def tiny_stage(name="supervised", method="supervised", **overrides):
    """A stage dict that trains in a second or two on digits at 16 px."""
    stage = {
        "name": name, "method": method,
        "data": {"dataset": "digits", "image_size": 16},
        "backbone": {"name": "small_cnn", "kwargs": {"width": 8}},
        "optimizer": {"name": "sgd", "lr": 0.05, "lr_scaling": "none", "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "cosine", "warmup_epochs": 0},
        "train": {"steps": 20, "batch_size": 32, "progress": False, "checkpoint_every_steps": 5,
                  "eval_every_epochs": 0, "log_every": 1},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(stage.get(key), dict):
            stage[key] = {**stage[key], **value}
        else:
            stage[key] = value
    return stage


@pytest.fixture
def tiny_recipe():
    def make(*stages, seed=0):
        from ssl_kit.config import validate_recipe

        return validate_recipe({"seed": seed, "name": "tiny", "stages": list(stages) or [tiny_stage()]})

    return make
