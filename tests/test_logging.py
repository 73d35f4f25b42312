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


def _step_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "step"]


def test_tensorboard_event_file_holds_scalars_views_and_figures_without_changing_training(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    stage = tiny_stage("fm", "fixmatch", data={"dataset": "digits", "image_size": 16, "labels_per_class": 4},
                       train={"steps": 4, "batch_size": 8, "log_every": 1}, mu=2)
    plain, _ = run_recipe(validate_recipe({"seed": 0, "name": "p", "stages": [stage]}), tmp_path / "plain")
    logged, _ = run_recipe(validate_recipe({"seed": 0, "name": "t", "tensorboard": {"enabled": True},
                                            "stages": [stage]}), tmp_path / "tb")
    assert _step_losses(logged) == _step_losses(plain)  # the views shown are drawn from a forked RNG
    assert not (plain / "tensorboard").exists()
    events = event_accumulator.EventAccumulator(str(logged / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    losses = [(e.step, e.value) for e in events.Scalars("fm/loss")]
    assert losses == [(step, pytest.approx(loss, rel=1e-6)) for step, loss in _step_losses(logged)]
    assert [e.step for e in events.Scalars("fm/lr")] == [1, 2, 3, 4]
    assert {"fm/views/weak", "fm/views/strong", "plots/training_curves"} <= set(tags["images"])
    weak = events.Images("fm/views/weak")[0]
    assert weak.step == 0 and weak.width > 16  # a grid of several 16 px images


def test_tensorboard_missing_package_names_the_extra(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    from ssl_kit.config import TensorBoardConfig
    from ssl_kit.engine.loggers import TensorBoardLogger
    from ssl_kit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"ssl_kit\[tensorboard\]"):
        TensorBoardLogger(TensorBoardConfig(enabled=True), tmp_path)
