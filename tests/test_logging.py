import json

import pytest

from ssl_kit.config import validate_recipe
from ssl_kit.runner import run_recipe
from tests.conftest import tiny_stage


@pytest.mark.slow
def test_wandb_offline_needs_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = validate_recipe({"seed": 0, "name": "w", "wandb": {"enabled": True},
                              "stages": [tiny_stage(train={"steps": 3})]})
    run_dir, summary = run_recipe(recipe, tmp_path / "run")
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert any(p.suffix == ".wandb" for p in offline_runs[0].iterdir())
    assert "supervised/test/top1" in summary


def test_metrics_jsonl_has_steps_and_epochs(tmp_path):
    recipe = validate_recipe({"seed": 0, "name": "m", "stages": [tiny_stage(train={"steps": 50, "log_every": 10})]})
    run_dir, _ = run_recipe(recipe, tmp_path / "run")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "step"]
    assert steps == [10, 20, 30, 40, 50]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert epochs and all("train/loss" in r for r in epochs)
    report = (run_dir / "report.md").read_text()
    assert "| supervised | test/top1 |" in report and "plots/training_curves.png" in report
    assert (run_dir / "plots" / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
