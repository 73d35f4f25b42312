import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("MPLBACKEND", "Agg")
# One intra-op thread per xdist worker (and for the processes tests start): `make test` runs 2 workers on 2 cores, and
# 2 threads each made the small-op steps of the ViT tests 7x slower (spinning threads competing for the cores:
# MAE pretraining, 5 epochs of mae_digits, 5.5 s with 1 thread vs 37.8 s with 2 while another process was busy).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)


def saved_vit(path, kwargs: dict, data_info: dict):
    """A seeded, untrained vit_tiny with `kwargs` written as an ssl_kit backbone.pt at `path` -> path."""
    from ssl_kit.engine.checkpoint import atomic_save, backbone_record
    from ssl_kit.models.registry import build_backbone

    torch.manual_seed(0)
    model = build_backbone("vit_tiny", data_info["channels"], data_info["image_size"], kwargs)
    atomic_save(backbone_record("vit_tiny", kwargs, data_info, model), path)
    return path


class Interrupted(Exception):
    """Raised by `interrupted_then_resumed`'s step callback: a run stopped without a clean shutdown."""


def interrupted_then_resumed(recipe, tmp_path, crash_step: int) -> tuple[dict, dict]:
    """Train `recipe` to the end in tmp_path/'a', and again in tmp_path/'b' stopped by an exception before step
    `crash_step` and then resumed there from its last checkpoint. -> (uninterrupted summary, resumed summary)."""
    from ssl_kit.runner import run_recipe

    _, reference = run_recipe(recipe, tmp_path / "a")

    def crash(step):
        if step == crash_step:
            raise Interrupted()

    with pytest.raises(Interrupted):
        run_recipe(recipe, tmp_path / "b", step_callback=crash)
    _, resumed = run_recipe(recipe, tmp_path / "b", resume=True)
    return reference, resumed


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


def build_semi_method(stage: dict):
    """A semi-supervised method built by hand from a stage dict (tiny CNN of width 8, seed 0), with its data.
    -> (method, prepared data)."""
    from ssl_kit.config import validate_recipe
    from ssl_kit.data.needs import DataNeeds
    from ssl_kit.data.pipeline import prepare_data
    from ssl_kit.methods import build_method
    from ssl_kit.models.registry import build_backbone

    cfg = validate_recipe({"seed": 0, "name": "t", "stages": [stage]}).stages[0]
    cls = build_method(stage["method"])
    data = prepare_data(cfg.data, 0, DataNeeds(unlabeled=True, unlabeled_ratio=cfg.mu))
    torch.manual_seed(0)
    backbone = build_backbone("small_cnn", data.info.channels, 16, {"width": 8})
    return cls(cfg, backbone, data.info, **cls.context_from(cfg, data, None)), data


def semi_batch(data, b: int = 8, mu: int = 2):
    """A hand-made step batch: the first b labeled and b·mu unlabeled training images (uint8), hidden labels and
    positions. -> Batch."""
    from ssl_kit.data.loader import Batch

    lab, unl = data.labeled[:b], data.unlabeled[:b * mu]
    return Batch(x=data.train.images[lab], y=data.train.labels[lab], u=data.train.images[unl],
                 u_y=data.train.labels[unl], u_index=torch.arange(b * mu), x_index=lab, u_image_index=unl)


@pytest.fixture
def tiny_recipe():
    def make(*stages, seed=0):
        from ssl_kit.config import validate_recipe

        return validate_recipe({"seed": seed, "name": "tiny", "stages": list(stages) or [tiny_stage()]})

    return make
