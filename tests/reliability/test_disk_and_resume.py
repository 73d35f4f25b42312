"""Disk full during checkpointing, and resuming under another world size."""
from __future__ import annotations

import pytest
import torch

from ssl_kit.config import validate_recipe
from ssl_kit.engine import checkpoint
from ssl_kit.engine.checkpoint import atomic_save, safe_load
from ssl_kit.errors import CheckpointError
from ssl_kit.runner import run_recipe
from tests.conftest import tiny_stage


def test_disk_full_mid_run_keeps_previous_checkpoint_and_stops_clearly(tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def disk_fills_up(obj, handle, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # checkpoints at steps 5 and 10 fit; the one at step 15 does not
            handle.write(b"\0" * 1000)
            raise OSError(28, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", disk_fills_up)
    recipe = validate_recipe({"seed": 0, "name": "disk", "stages": [tiny_stage()]})
    with pytest.raises(CheckpointError, match=r"last\.pt.*No space left on device.*previous file is intact"):
        run_recipe(recipe, tmp_path / "run")
    monkeypatch.undo()
    assert safe_load(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 10
    assert not list((tmp_path / "run").rglob("*.tmp"))
    # the run continues once there is space again
    _, summary = run_recipe(recipe, tmp_path / "run", resume=True)
    assert 0 <= summary["supervised/test/top1"] <= 1


def test_resume_under_another_world_size_refuses_clearly(tmp_path):
    recipe = validate_recipe({"seed": 0, "name": "ws", "stages": [tiny_stage(train={"steps": 20})]})
    run = tmp_path / "run"
    run_recipe(recipe, run)
    state = safe_load(run / "checkpoints" / "last.pt")
    state["step"], state["world_size"] = 10, 2
    atomic_save(state, run / "checkpoints" / "last.pt")
    summary = (run / "summary.json")
    summary.write_text("{}")
    with pytest.raises(CheckpointError, match="written by 2 processes, this run has 1.*same world size"):
        run_recipe(recipe, run, resume=True)
