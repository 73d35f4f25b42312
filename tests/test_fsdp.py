"""train.strategy fsdp (FSDP2 fully_shard) against DistributedDataParallel, launched as users launch it (torchrun,
gloo on the CPU, 2 processes).

Both strategies reduce the same gradients (DDP all-reduces the mean, FSDP reduce-scatters it), so with the
deterministic views of test_ddp_equality the fsdp twin of a stage logs the same per-step losses and ends with the
same weights as its ddp twin, up to float summation order (rel 1e-4 on losses, 2e-5 on weights). The twins run in one
recipe (each stage is seeded alike, so each pair starts from the same weights) and cover: a GroupNorm CNN with
gathered negatives and gradient accumulation plus gradient clipping (SimCLR), momentum teachers sharded like their
students on a 2-block ViT (BYOL), a momentum teacher with a weight-normalised last layer frozen at step 0 (DINO), a
ViT encoder and decoder (MAE), mid-run evaluation of a sharded ViT classifier (supervised) and the trainer's replicated
EMA copy of one, saved as its backbone.pt (FixMatch).
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml

from ssl_kit.config import validate_recipe
from ssl_kit.engine.checkpoint import resolve_checkpoint, safe_load
from ssl_kit.errors import ConfigError, TrainingError
from ssl_kit.runner import run_recipe
from tests.test_ddp_equality import _stage, finish, start_torchrun, step_losses
from tests.test_distributed import free_port

VIT2 = {"name": "vit_tiny", "kwargs": {"patch_size": 4, "dim": 16, "depth": 2, "heads": 2}}
CONTRASTIVE = {"proj_dim": 8, "proj_hidden_dim": 16, "temperature": 0.2}


def twin_stages() -> list[dict]:
    """(ddp, fsdp) twins of five small stages, 3 steps each on a global batch of 16; the last stage is fsdp."""
    adamw = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}
    bases = [
        ("simclr", "simclr", {**CONTRASTIVE, "train": {"accumulate": 2, "clip_grad_norm": 1.0}}),
        ("byol", "byol", {"backbone": VIT2, "views": {"solarize_prob": 0.5}, "momentum": 0.9, "proj_dim": 8,
                          "proj_hidden_dim": 16, "pred_hidden_dim": 16}),
        ("dino", "dino", {"out_dim": 16, "head_hidden_dim": 16, "bottleneck_dim": 8, "local_crops": 2,
                          "local_crop_size": 0.5, "freeze_last_layer_epochs": 0.01}),
        ("supervised", "supervised", {"backbone": VIT2, "data": {"labels_per_class": 2},
                                      "train": {"eval_every_epochs": 1}}),
        ("fixmatch", "fixmatch", {"mu": 2, "threshold": 0.0, "data": {"labels_per_class": 5},
                                  "train": {"ema_decay": 0.5}}),
        ("mae", "mae", {"backbone": VIT2, "decoder_dim": 8, "decoder_depth": 1, "decoder_heads": 2,
                        "optimizer": adamw}),
    ]
    stages = []
    for name, method, extra in bases:
        for strategy in ("ddp", "fsdp"):
            train = {**extra.get("train", {}), "strategy": strategy}
            stages.append(_stage(f"{name}_{strategy}", method, **{**extra, "train": train}))
    return stages


def backbone_tensors(path) -> dict[str, torch.Tensor]:
    record = safe_load(path)
    head = record.get("head") or {"state_dict": {}}
    return {**record["state_dict"], **{f"head.{k}": v for k, v in head["state_dict"].items()}}


def write_recipe(path, name: str, stages: list[dict]):
    path.write_text(yaml.safe_dump({"seed": 0, "name": name, "stages": stages}))
    return path


@pytest.fixture(scope="module")
def twin_run(tmp_path_factory):
    """One torchrun launch (2 gloo processes) of every twin."""
    root = tmp_path_factory.mktemp("fsdp")
    stages = twin_stages()
    recipe = write_recipe(root / "recipe.yaml", "twins", stages)
    launch = start_torchrun(["--nproc-per-node", "2", "--master-port", str(free_port())],
                            ["--deterministic-views", "ssl-kit", "run", str(recipe), "--out", str(root / "run")])
    finish(launch)
    return root / "run", [s["name"] for s in stages]


def epoch_tests(run_dir) -> dict[str, list[float]]:
    """Per stage, the mid-run test accuracies of its epoch records (train.eval_every_epochs)."""
    out: dict[str, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "epoch" and "test/top1" in record:
            out.setdefault(record["stage"], []).append(record["test/top1"])
    return out


@pytest.mark.slow
def test_fsdp_trains_as_ddp_does_on_two_processes(twin_run):
    """Losses and final weights of every twin; the supervised twin also evaluates mid-run (all-gathered weights)."""
    run_dir, names = twin_run
    evaluated = epoch_tests(run_dir)
    assert len(evaluated["supervised_fsdp"]) == 2
    assert evaluated["supervised_fsdp"] == pytest.approx(evaluated["supervised_ddp"], abs=1e-6)
    losses = step_losses(run_dir)
    for name in (n[:-len("_fsdp")] for n in names if n.endswith("_fsdp")):
        assert len(losses[f"{name}_fsdp"]) == len(losses[f"{name}_ddp"]) == 3, name
        assert losses[f"{name}_fsdp"] == pytest.approx(losses[f"{name}_ddp"], rel=1e-4), name
        ddp = backbone_tensors(run_dir / "stages" / f"{name}_ddp" / "backbone.pt")
        sharded = backbone_tensors(run_dir / "stages" / f"{name}_fsdp" / "backbone.pt")
        assert sorted(sharded) == sorted(ddp), name
        for key, value in ddp.items():
            assert sharded[key].shape == value.shape, (name, key)
            assert torch.allclose(sharded[key], value, atol=2e-5, rtol=1e-4), (name, key)


@pytest.mark.slow
def test_fsdp_backbone_is_the_full_final_state_and_loads(twin_run, capsys):
    """backbone.pt of the last (fsdp) stage holds exactly the backbone weights of the gathered final checkpoint, and
    `ssl-kit info` reads it."""
    from ssl_kit.cli import main as cli_main  # deferred: the CLI parser is only needed here

    run_dir, _ = twin_run
    checkpoint = safe_load(run_dir / "checkpoints" / "last.pt")
    assert checkpoint["stage"] == "mae_fsdp" and checkpoint["strategy"] == "fsdp"
    assert not any(type(v).__name__ == "DTensor" for v in checkpoint["method"].values())
    from_checkpoint = resolve_checkpoint(run_dir / "checkpoints" / "last.pt")["state_dict"]
    written = safe_load(run_dir / "stages" / "mae_fsdp" / "backbone.pt")["state_dict"]
    assert sorted(written) == sorted(from_checkpoint)
    assert all(torch.equal(written[k], from_checkpoint[k]) for k in written)
    assert cli_main(["info", "--checkpoint", str(run_dir / "stages" / "mae_fsdp" / "backbone.pt")]) == 0
    assert "vit_tiny" in capsys.readouterr().out


@pytest.mark.slow
def test_fsdp_resume_after_a_killed_worker_equals_an_uninterrupted_run(tmp_path):
    """torchrun --max-restarts 1, rank 1 killed before step 3: the restarted workers load the gathered checkpoint of
    step 2 into the sharded method and optimizer (AdamW moments, momentum teacher) and end as the uninterrupted run."""
    stage = _stage("byol", "byol", backbone=VIT2, momentum=0.9, proj_dim=8, proj_hidden_dim=16, pred_hidden_dim=16,
                   optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
                   train={"steps": 4, "checkpoint_every_steps": 2, "strategy": "fsdp"})
    recipe = write_recipe(tmp_path / "recipe.yaml", "resume", [stage])
    launches = {name: start_torchrun(["--nproc-per-node", "2", "--max-restarts", "1", "--master-port", str(port)],
                                     [*extra, "ssl-kit", "run", str(recipe), "--out", str(tmp_path / name)])
                for (name, extra), port in zip((("uninterrupted", []), ("killed", ["--exit-rank1-at-step", "3"])),
                                               (free_port(), free_port()))}
    logs = {name: finish(launch) for name, launch in launches.items()}
    assert "elastic restart 1: resuming" in logs["killed"]
    losses = {name: step_losses(tmp_path / name)["byol"] for name in launches}
    assert losses["killed"] == losses["uninterrupted"] and len(losses["killed"]) == 4
    a, b = (safe_load(tmp_path / name / "checkpoints" / "last.pt") for name in launches)
    assert sorted(a["method"]) == sorted(b["method"])
    assert all(torch.equal(a["method"][k], b["method"][k]) for k in a["method"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()


def test_bad_strategy_is_a_config_error():
    stage = _stage("s", "simclr", train={"strategy": "zero3"})
    with pytest.raises(ConfigError, match="strategy"):
        validate_recipe({"seed": 0, "name": "bad", "stages": [stage]})


def test_fsdp_in_one_process_warns_and_trains_as_ddp(tmp_path):
    """No torchrun: nothing to shard; a warning, then the same numbers as strategy ddp (bit for bit)."""
    stages = [_stage(f"simclr_{s}", "simclr", **CONTRASTIVE, train={"steps": 2, "strategy": s})
              for s in ("ddp", "fsdp")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_dir, _ = run_recipe(validate_recipe({"seed": 0, "name": "one", "stages": stages}), tmp_path)
    assert any("train.strategy fsdp without torchrun" in str(w.message) for w in caught)
    losses = step_losses(run_dir)
    assert losses["simclr_fsdp"] == losses["simclr_ddp"]
    a, b = (backbone_tensors(run_dir / "stages" / n / "backbone.pt") for n in ("simclr_ddp", "simclr_fsdp"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "strategy" not in safe_load(run_dir / "checkpoints" / "last.pt")  # the ddp checkpoint format


def test_a_method_fsdp_breaks_is_refused_before_its_first_step(tmp_path):
    """DINOv2 with Gram anchoring copies a sharded teacher's state dict inside its step: refused when the stage
    starts, naming the method and the way out, before any step is logged."""
    stage = _stage("gram", "dinov2", backbone=VIT2, gram_weight=1.0, gram_start_fraction=0.0,
                   train={"steps": 2, "strategy": "fsdp"})
    with pytest.raises(TrainingError, match="method 'dinov2' cannot train with train.strategy fsdp.*strategy: ddp"):
        run_recipe(validate_recipe({"seed": 0, "name": "gram", "stages": [stage]}), tmp_path)
    assert not any('"kind": "step"' in path.read_text() for path in tmp_path.rglob("metrics.jsonl"))
