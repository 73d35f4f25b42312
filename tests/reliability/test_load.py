"""Load: many short runs in one process do not grow memory; frequent checkpointing stays a small fraction of the
training time, and old checkpoints rotate per train.keep_last."""
from __future__ import annotations

import gc
import time
from pathlib import Path

import pytest

from ssl_kit.config import validate_recipe
from ssl_kit.engine import trainer as trainer_module
from ssl_kit.runner import run_recipe
from tests.conftest import tiny_stage


def rss_mb() -> float:
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_many_runs_in_one_process_do_not_grow_memory(tmp_path):
    recipe = validate_recipe({"seed": 0, "name": "soak", "stages": [
        tiny_stage(train={"steps": 8, "checkpoint_every_steps": 4}),
        {"name": "knn", "method": "knn"}]})
    readings = []
    for i in range(16):
        run_recipe(recipe, tmp_path / f"run{i}")
        gc.collect()
        readings.append(rss_mb())
    settled, final = readings[5], readings[-1]
    assert final - settled < 40, f"RSS grew from {settled:.0f} MB (run 6) to {final:.0f} MB (run 16): {readings}"


@pytest.mark.slow
def test_frequent_checkpoints_cost_little_and_rotate(tmp_path, monkeypatch):
    spent = []
    real_save = trainer_module.atomic_save

    def timed_save(*args, **kwargs):
        start = time.perf_counter()
        real_save(*args, **kwargs)
        spent.append(time.perf_counter() - start)

    monkeypatch.setattr(trainer_module, "atomic_save", timed_save)
    stage = tiny_stage(train={"steps": 300, "checkpoint_every_steps": 25, "keep_last": 3, "batch_size": 64},
                       backbone={"name": "small_cnn", "kwargs": {"width": 32}})
    recipe = validate_recipe({"seed": 0, "name": "ckpt", "stages": [stage]})
    _, summary = run_recipe(recipe, tmp_path / "run")
    fraction = sum(spent) / summary["supervised/train_seconds"]
    assert len(spent) >= 2 * 12  # last.pt + a step snapshot every 25 steps
    assert fraction < 0.15, f"checkpointing took {fraction:.0%} of training time"
    snapshots = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*.pt"))
    assert snapshots == ["step-000000275.pt", "step-000000300.pt"]  # keep_last 3 = last.pt + the 2 newest
