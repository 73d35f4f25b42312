"""Fast checks of the DDP plumbing: lr scaling by global batch, per-method find_unused_parameters, per-rank step
seeds, the trainer's wrapping under a one-process gloo group (no launcher needed), and how a torchrun worker exits."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as torch_dist

from ssl_kit.config import OptimizerConfig, validate_recipe
from ssl_kit.data.pipeline import prepare_data
from ssl_kit.engine import distributed as dist
from ssl_kit.engine.optim import lr_scaling_message, scaled_lr
from ssl_kit.engine.trainer import RunContext, Trainer
from ssl_kit.errors import TrainingError
from ssl_kit.methods import build_method
from ssl_kit.models.registry import build_backbone
from tests.conftest import tiny_stage


def test_lr_scaling_states_base_batch_and_result():
    linear = OptimizerConfig(name="lars", lr=0.3, lr_scaling="linear")
    assert scaled_lr(linear, 1024) == pytest.approx(1.2)
    assert lr_scaling_message(linear, 1024) == "lr 0.3 × (1024/256) = 1.2 (linear scaling, global batch 1024)"
    sqrt = OptimizerConfig(lr=0.1, lr_scaling="sqrt", base_batch_size=64)
    assert scaled_lr(sqrt, 256) == pytest.approx(0.2)
    assert lr_scaling_message(sqrt, 256) == "lr 0.1 × √(256/64) = 0.2 (sqrt scaling, global batch 256)"
    assert lr_scaling_message(OptimizerConfig(lr=0.05), 32) == "lr 0.05 (no scaling, global batch 32)"
    assert scaled_lr(OptimizerConfig(lr=0.05, base_batch_size=8), 32) == 0.05


def _stage_cfg(method, **extra):
    return validate_recipe({"seed": 0, "stages": [tiny_stage("s", method, **extra)]}).stages[0]


def test_find_unused_parameters_by_method_and_override():
    assert dist.find_unused_parameters(_stage_cfg("supervised")) is False
    assert dist.find_unused_parameters(_stage_cfg("dino")) is True  # last layer frozen for the first epoch
    assert dist.find_unused_parameters(_stage_cfg("simclr")) is True  # online probe skipped without labels
    assert dist.find_unused_parameters(_stage_cfg("simclr", online_probe={"enabled": False})) is False
    assert dist.find_unused_parameters(_stage_cfg("dino", train={"ddp_find_unused_parameters": False})) is False


def test_step_seeds_differ_per_rank_and_repeat_per_step():
    seeds = {dist.step_seed(0, step, micro, rank) for step in range(3) for micro in range(2) for rank in range(4)}
    assert len(seeds) == 24
    assert dist.step_seed(7, 5, 1, 3) == dist.step_seed(7, 5, 1, 3)


@pytest.fixture
def one_rank_group():
    torch_dist.init_process_group("gloo", store=torch_dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch_dist.destroy_process_group()


def _trainer(tmp_path, method, **extra):
    cfg = _stage_cfg(method, **extra)
    data = prepare_data(cfg.data, 0)
    backbone = build_backbone(cfg.backbone.name, data.info.channels, data.info.image_size, cfg.backbone.kwargs)
    method_obj = build_method(method)(cfg, backbone, data.info)
    return Trainer(method_obj, data, cfg, RunContext(tmp_path, 0), {})


def test_trainer_wraps_method_in_ddp_and_freezes_untrained_parameters(tmp_path, one_rank_group):
    trainer = _trainer(tmp_path, "simclr", proj_dim=4, proj_hidden_dim=8, online_probe={"enabled": False},
                       train={"steps": 2, "batch_size": 16})
    assert isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel)
    assert trainer.model.module is trainer.method
    assert not any(p.requires_grad for p in trainer.method.probe.parameters())  # no optimizer group holds it
    before = trainer.method.projector[0].weight.detach().clone()
    logs = trainer._train_step()
    assert torch.isfinite(logs["loss"]) and not torch.equal(before, trainer.method.projector[0].weight)


def test_sync_bn_on_cpu_under_ddp_is_refused_clearly(tmp_path, one_rank_group):
    with pytest.raises(TrainingError, match=r"stages\[s\]\.backbone\.sync_bn needs CUDA devices.*"
                                            r"set backbone\.sync_bn=false"):
        _trainer(tmp_path, "supervised", backbone={"name": "small_cnn", "kwargs": {"width": 4}, "sync_bn": True},
                 train={"device": "cpu"})


WORKER_EXIT = """
import atexit, builtins, sys
import torch.distributed
from ssl_kit.cli import console_main

class Teardown:
    def __del__(self):
        sys.stderr.write("interpreter teardown\\n")

builtins._teardown_witness = Teardown()  # deleted only when the interpreter tears its modules down
atexit.register(lambda: sys.stderr.write("exit handler\\n"))
console_main(["info", "--checkpoint", "no-such-file.pt"])
"""


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_torchrun_worker_exits_with_its_status_after_its_exit_handlers_and_without_teardown(world_size, tmp_path):
    """Under torchrun (WORLD_SIZE > 1) the `ssl-kit` executable ends through `end_worker`: the command's status, the
    exit handlers run once, and no interpreter teardown (where a restarted FSDP worker aborted); a plain process
    exits as Python does."""
    env = {**os.environ, "WORLD_SIZE": world_size}
    done = subprocess.run([sys.executable, "-c", WORKER_EXIT], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr  # the missing checkpoint is bad input
    assert "no-such-file.pt" in done.stderr
    assert done.stderr.count("exit handler") == 1
    assert ("interpreter teardown" in done.stderr) == (world_size == "1")
