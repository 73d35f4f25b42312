"""DistributedDataParallel against one process, launched as users launch it (torchrun, gloo on the CPU).

What is compared and why it must be equal: a global batch of B images split over 2 ranks (B/2 each) gives each rank
the mean loss over its half; DDP averages the two ranks' gradients, which is the gradient of the mean loss over all B
images — what one process computes on the same B images — provided that
  * each rank's loss sees what one process sees: SimCLR's negatives are gathered from every rank (gather_with_grad),
    MoCo v2's queue is filled with every rank's keys (same set of keys; the queue order differs, which the loss does
    not see), DINO's centre is the mean over all ranks, FixMatch and MAE losses are per-sample means; Barlow Twins
    all-reduces its batch statistics and cross-correlation, VICReg gathers the projections for variance and
    covariance, SwAV all-reduces Sinkhorn's sums over samples (each rank's queue included), NNCLR fills its support
    set with every rank's embeddings and gathers the keys, SupCon gathers views and labels (positives across ranks),
    iBOT all-reduces its [CLS] and patch centres; BYOL's and SimSiam's losses are per-sample means; DARP and CReST
    gather their whole-set pseudo-label banks, AdaMatch its labeled confidence and class means, SimMatch and
    SimMatchV2 their banks and alignment means, DebiasPL its prior;
  * the randomness does not depend on how the batch is split: on-device augmentation draws per rank, so the runs use
    `tests/ddp_worker.py::deterministic_views` (views, strong views, crops and MAE/iBOT masks become fixed functions
    of the image, every projector/predictor MLP BN-free) and BatchNorm-free backbones (small_cnn with GroupNorm,
    which normalises each sample alone, and a ViT; torch's SyncBatchNorm is GPU-only, and per-rank BN statistics
    differ from one process's by design).
Then the per-step losses (rank-averaged, as metrics.jsonl logs them) and the final weights agree up to float
summation order: rel 1e-4 on losses, 2e-5 absolute on weights after 3 SGD/AdamW steps.

The inputs must not be degenerate or the comparison proves nothing: random ReLU CNN features of digits are nearly
collinear (mean pairwise cosine ≈ 0.99 for small_cnn; with norm none their batch spread is ~1e-4), which pins NT-Xent,
SupCon and NNCLR at ln(#negatives) and Barlow Twins at D whatever the gathering does. Hence GroupNorm in the CNN, the
ViT (cosine ≈ 0.88) for the self-supervised stages, two views that differ (view 2 mirrored) and AdamW for iBOT (SGD
at lr 0.05 collapses its teacher's outputs within a step). Checked by hand: dropping any one of the gathers listed
above (Barlow, VICReg, Sinkhorn, NNCLR keys or support set, SupCon, iBOT patch or [CLS] centre) fails this test;
with `gather_no_grad` returning each rank's own rows, AdaMatch, SimMatch, SimMatchV2 and DebiasPL fail it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ssl_kit.config import validate_recipe
from ssl_kit.engine.checkpoint import safe_load
from ssl_kit.runner import run_recipe
from tests.conftest import tiny_stage
from tests.ddp_worker import deterministic_views
from tests.test_distributed import free_port

WORKER = Path(__file__).with_name("ddp_worker.py")
CNN = {"name": "small_cnn", "kwargs": {"width": 4, "norm": "group"}}
VIT = {"name": "vit_tiny", "kwargs": {"patch_size": 4, "dim": 16, "depth": 1, "heads": 2}}


def _stage(name, method, **extra):
    train = {"steps": 3, "batch_size": 16, "log_every": 1, **extra.pop("train", {})}
    data = {"dataset": "digits", "image_size": 16, "translate": 0.0, **extra.pop("data", {})}
    return tiny_stage(name, method, backbone=extra.pop("backbone", CNN), train=train, data=data, **extra)


def equality_stages() -> list[dict]:
    """One tiny stage per method (3 steps, global batch 16), and SimCLR again with gradient accumulation."""
    contrastive = {"proj_dim": 8, "proj_hidden_dim": 16, "temperature": 0.2}
    return [*core_stages(contrastive), *semi_supervised_stages(), *self_supervised_stages(contrastive)]


def semi_supervised_stages() -> list[dict]:
    """The weak/strong methods whose state spans ranks: AdaMatch's relative cut-off (the labeled batch's mean
    confidence) and labeled-target alignment, SimMatch's labeled bank and alignment queue, SimMatchV2's banks and
    aligned teacher, DebiasPL's prior p̂ — each gathered. (Threshold policies and ACR whose state only changes the
    masks, which 3 steps from random weights do not flip, are compared in test_semi_state_distributed.py.)"""
    semi = {"mu": 2, "data": {"labels_per_class": 5}}
    return [
        # τ 1.0: about half of the images clear the labeled batch's mean confidence; fast EMAs (0.01) follow the batch
        _stage("adamatch", "adamatch", threshold=1.0, logit_interpolation=False, ema_p=0.01, unsup_warmup=0.0, **semi),
        _stage("simmatch", "simmatch", threshold=0.0, proj_size=8, da_len=4, **semi),
        _stage("simmatchv2", "simmatchv2", threshold=0.0, proj_size=8, topn=4, bank_batches=2, ema_m=0.9, **semi),
        _stage("debiaspl", "debiaspl", threshold=0.0, ema_p=0.5, **semi),
    ]


def self_supervised_stages(contrastive: dict) -> list[dict]:
    """BYOL, SimSiam, Barlow Twins, VICReg, SwAV, NNCLR, SupCon, iBOT: what each gathers over ranks is exercised —
    Barlow's all-reduced cross-correlation and VICReg's gathered variance/covariance, SwAV's Sinkhorn sums with a
    per-rank queue that is full and used from step 1 (16 rows in all: 8 per rank), NNCLR's support set (32 rows,
    overwritten by gathered embeddings) and gathered keys, SupCon's gathered views and labels, iBOT's [CLS] and
    patch centres (and its mask token under the fixed mask); BYOL's and SimSiam's losses are per-sample means."""
    two_views = {"backbone": VIT, "views": {"solarize_prob": 0.5}}  # under deterministic_views: view 2 mirrored
    projected = {**two_views, "proj_dim": 8, "proj_hidden_dim": 16}
    predicted = {**projected, "pred_hidden_dim": 16}
    contrastive = {**contrastive, **two_views}
    return [
        _stage("byol", "byol", momentum=0.9, **predicted),
        _stage("simsiam", "simsiam", **predicted),
        _stage("barlow_twins", "barlow_twins", **projected),
        _stage("vicreg", "vicreg", **projected),
        _stage("swav", "swav", n_prototypes=16, local_crops=2, local_crop_size=0.5, queue_length=16,
               queue_start_epochs=0, freeze_prototypes_epochs=0.01, **contrastive),  # prototypes frozen at step 0
        _stage("nnclr", "nnclr", support_set_size=32, pred_hidden_dim=16, **contrastive),
        _stage("supcon", "supcon", **contrastive),
        _stage("ibot", "ibot", backbone=VIT, out_dim=16, patch_out_dim=16, head_hidden_dim=16, bottleneck_dim=8,
               local_crops=2, local_crop_size=0.5, freeze_last_layer_epochs=0.01, center_momentum=0.5,
               optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}),
    ]


def core_stages(contrastive: dict) -> list[dict]:
    """SimCLR, MoCo v2, FixMatch, DARP, CReST, DINO, MAE, and SimCLR with gradient accumulation."""
    return [
        _stage("simclr", "simclr", **contrastive),
        _stage("mocov2", "mocov2", queue_size=64, momentum=0.9, **contrastive),
        _stage("fixmatch", "fixmatch", mu=2, threshold=0.0, data={"labels_per_class": 5}),
        # whole-set banks gathered over ranks: DARP refines every step, CReST chooses at steps 1 and 2
        _stage("darp", "darp", mu=2, threshold=0.0, warmup_fraction=0.0, num_refine_iter=1, iter_t=3,
               data={"labels_per_class": 5}),
        _stage("crest", "crest", mu=2, threshold=0.0, num_gens=3, data={"labels_per_class": 5}),
        _stage("dino", "dino", out_dim=16, head_hidden_dim=16, bottleneck_dim=8, local_crops=2,
               local_crop_size=0.5, freeze_last_layer_epochs=0.01),  # last layer frozen at step 0 only
        _stage("mae", "mae", backbone=VIT, decoder_dim=8, decoder_depth=1, decoder_heads=2,
               optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}),
        _stage("simclr_accum", "simclr", train={"accumulate": 2}, **contrastive),
    ]


def start_torchrun(args: list[str], worker_args: list[str]) -> subprocess.Popen:
    """torchrun [args] tests/ddp_worker.py [worker_args], started in the background (stdout/stderr piped)."""
    command = [sys.executable, "-m", "torch.distributed.run", *args, str(WORKER), *worker_args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish(process: subprocess.Popen, timeout: int = 400) -> str:
    """Wait for a started launch; -> its stderr, after asserting it succeeded."""
    _, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return err


def step_losses(run_dir: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "step":
            out.setdefault(record["stage"], []).append(record["loss"])
    return out


def assert_same_training(single: Path, ddp: Path, stages: list[str]) -> None:
    single_losses, ddp_losses = step_losses(single), step_losses(ddp)
    for stage in stages:
        assert len(ddp_losses[stage]) == len(single_losses[stage]) > 0, stage
        assert ddp_losses[stage] == pytest.approx(single_losses[stage], rel=1e-4), stage
        a = safe_load(single / "stages" / stage / "backbone.pt")
        b = safe_load(ddp / "stages" / stage / "backbone.pt")
        tensors = {**a["state_dict"], **{f"head.{k}": v for k, v in a["head"]["state_dict"].items()}}
        other = {**b["state_dict"], **{f"head.{k}": v for k, v in b["head"]["state_dict"].items()}}
        for key, value in tensors.items():
            assert torch.allclose(value, other[key], atol=2e-5, rtol=1e-4), (stage, key)


def single_process_run(monkeypatch, stages: list[dict], out: Path) -> Path:
    deterministic_views(monkeypatch.setattr)
    recipe = validate_recipe({"seed": 0, "name": "ddp", "stages": stages})
    run_dir, _ = run_recipe(recipe, out)
    return run_dir


@pytest.mark.slow
def test_two_processes_equal_one_process_for_every_method_and_accumulation(tmp_path, monkeypatch):
    stages = equality_stages()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"seed": 0, "name": "ddp", "stages": stages}))
    launch = start_torchrun(["--nproc-per-node", "2", "--master-port", str(free_port())],
                            ["--deterministic-views", "ssl-kit", "run", str(recipe), "--out", str(tmp_path / "ddp")])
    single = single_process_run(monkeypatch, stages, tmp_path / "single")  # meanwhile
    finish(launch)
    assert_same_training(single, tmp_path / "ddp", [s["name"] for s in stages])
    assert safe_load(tmp_path / "ddp" / "checkpoints" / "last.pt")["world_size"] == 2
