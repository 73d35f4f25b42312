"""Launches as on a cluster, on this machine (CPU, gloo): two "nodes" of one process each joined by a c10d rendezvous on
localhost, each with its own --out dir (no shared filesystem), running a whole recipe — pretraining, a fine-tune
from it (init.from_stage), a KD student of that (teacher.from_stage) and a kNN evaluation; and an elastic restart
after a killed worker."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from ssl_kit.engine.checkpoint import safe_load
from tests.test_ddp_equality import WORKER, _stage, assert_same_training, finish, single_process_run, start_torchrun
from tests.test_distributed import free_port

TIMING_KEYS = ("train_seconds", "images_per_s")


def whole_recipe_stages() -> list[dict]:
    return [
        _stage("pretrain", "simclr", proj_dim=8, proj_hidden_dim=16),
        _stage("finetune", "supervised", init={"from_stage": "pretrain"}, train={"steps": 2}),
        _stage("distill", "kd", teacher={"from_stage": "finetune"}, train={"steps": 2},
               backbone={"name": "small_cnn", "kwargs": {"width": 2, "norm": "none"}}),
        {"name": "knn", "method": "knn", "from_stage": "pretrain"},
    ]


def without_timing(summary: dict) -> dict:
    """A summary less what must differ between two runs: timings and the runs' own paths."""
    return {k: v for k, v in summary.items() if not k.endswith(TIMING_KEYS) and k != "_backbones"}


@pytest.mark.slow
def test_two_nodes_without_shared_filesystem_run_a_whole_recipe(tmp_path, monkeypatch):
    """Each node writes into its own dir; only global rank 0 writes, so exactly one dir gets a run and the other stays
    empty: every backbone, checkpoint and evaluation result the other node needs came by broadcast. The training
    equals one process on the same global batch (see test_ddp_equality for why)."""
    stages = whole_recipe_stages()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"seed": 0, "name": "nodes", "stages": stages}))
    port = free_port()
    nodes = []
    for node in (0, 1):
        args = ["--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "nodes-test"]
        out = tmp_path / f"node{node}"
        command = [sys.executable, "-m", "torch.distributed.run", *args, str(WORKER), "--deterministic-views",
                   "ssl-kit", "run", str(recipe), "--out", str(out)]
        nodes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    outputs = [node.communicate(timeout=400) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    written = [tmp_path / f"node{n}" for n in (0, 1) if (tmp_path / f"node{n}" / "summary.json").is_file()]
    assert len(written) == 1
    other = ({tmp_path / "node0", tmp_path / "node1"} - set(written)).pop()
    assert not other.exists() or not any(other.iterdir()), sorted(other.rglob("*"))
    summary = json.loads((written[0] / "summary.json").read_text())
    assert summary["_completed_stages"] == ["pretrain", "finetune", "distill", "knn"]
    assert 0.0 <= summary["knn/top1"] <= 1.0
    single = single_process_run(monkeypatch, stages, tmp_path / "single")
    assert_same_training(single, written[0], ["pretrain", "finetune", "distill"])


def streamed_tree(root) -> str:
    """A folder of 96 small JPEGs as a streamed `images:` source (its DataLoader workers read and crop them)."""
    from tests.test_stream_memory import tiny_jpegs

    return f"images:{tiny_jpegs(root, 96)},storage=stream"


@pytest.mark.slow
@pytest.mark.parametrize("source", ["digits", "streamed"])
def test_elastic_restart_after_a_killed_worker_equals_an_uninterrupted_run(tmp_path, source):
    """torchrun --max-restarts 1: rank 1 dies (os._exit) before step 3 in the first attempt; torchrun restarts both
    workers, which continue from checkpoints/last.pt (step 2) without --resume. Views are per-rank seeded from
    (seed, step, micro-step, rank), so the restarted steps draw what the uninterrupted run drew: the summary (less
    timings), the loss trajectory and the final weights are identical — in memory, and streamed from an image folder
    (the DataLoader workers of the killed group must not hold the run lock, and the stream resumes where it was)."""
    data = {"translate": 0.125} if source == "digits" else {"dataset": streamed_tree(tmp_path / "images")}
    stage = _stage("pretrain", "simclr", proj_dim=8, proj_hidden_dim=16,
                   train={"steps": 6, "checkpoint_every_steps": 2},
                   data=data)  # real random views this time
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"seed": 0, "name": "elastic", "stages": [stage]}))
    launches = {name: start_torchrun(["--nproc-per-node", "2", "--max-restarts", "1", "--master-port", str(port)],
                                     [*extra, "ssl-kit", "run", str(recipe), "--out", str(tmp_path / name)])
                for (name, extra), port in zip((("uninterrupted", []), ("killed", ["--exit-rank1-at-step", "3"])),
                                               (free_port(), free_port()))}  # side by side
    runs = {name: (tmp_path / name, finish(launch)) for name, launch in launches.items()}
    assert "rank 1 exits at step 3" in runs["killed"][1]
    assert "elastic restart 1: resuming" in runs["killed"][1]
    summaries = {k: json.loads((d / "summary.json").read_text()) for k, (d, _) in runs.items()}
    assert without_timing(summaries["killed"]) == without_timing(summaries["uninterrupted"])
    steps = {k: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
             for k, (d, _) in runs.items()}
    losses = {k: [(r["step"], r["loss"]) for r in v if r.get("kind") == "step"] for k, v in steps.items()}
    assert losses["killed"] == losses["uninterrupted"] and len(losses["killed"]) == 6
    a, b = (safe_load(d / "checkpoints" / "last.pt")["method"] for d, _ in runs.values())
    assert all(torch.equal(a[k], b[k]) for k in a)
