"""Nothing lost on a crash: SIGKILL a real training process mid-step, mid-checkpoint-write and mid-eval; the run
dir stays readable, `--resume` continues from the last complete checkpoint, and the finished summary equals an
uninterrupted run with the same seed (bit-exact on CPU)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ssl_kit.engine.checkpoint import safe_load
from tests.conftest import tiny_stage

WORKER = Path(__file__).with_name("fault_worker.py")
TIMING_KEYS = ("train_seconds", "images_per_s")


def write_recipe(path: Path) -> Path:
    stage = tiny_stage(train={"steps": 60, "checkpoint_every_steps": 10, "log_every": 1})
    probe = {"name": "linear_probe", "method": "linear_probe", "epochs": 5}
    path.write_text(yaml.safe_dump({"seed": 3, "name": "crash", "stages": [stage, probe]}))
    return path


def launch(mode: str, marker: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), mode, str(marker), "--", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(condition, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("the moment to kill never came")


def comparable(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if not k.endswith(TIMING_KEYS) and k != "run_dir"}


def finish(recipe: Path, out: Path, *extra: str) -> dict:
    process = launch("none", out.parent / "unused", "run", str(recipe), "--out", str(out), "--json", *extra)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return comparable(json.loads(stdout))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    recipe = write_recipe(folder / "recipe.yaml")
    return recipe, finish(recipe, folder / "run")


def assert_consistent(run: Path) -> None:
    """Whatever is on disk after the kill is complete: the checkpoint loads, summary/metrics parse."""
    last = run / "checkpoints" / "last.pt"
    if last.exists():
        state = safe_load(last)
        assert state["step"] % 10 == 0 and state["step"] > 0
    if (run / "summary.json").exists():
        json.loads((run / "summary.json").read_text())
    assert (run / "config.yaml").is_file()


def metric_lines(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["mid-step", "mid-checkpoint-write", "mid-eval"])
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, reference, moment):
    recipe, expected = reference
    run, marker = tmp_path / "run", tmp_path / "marker"
    mode = {"mid-step": "none", "mid-checkpoint-write": "checkpoint", "mid-eval": "eval"}[moment]
    process = launch(mode, marker, "run", str(recipe), "--out", str(run))
    if moment == "mid-step":
        wait_until(lambda: metric_lines(run) >= 27)  # past the checkpoints at 10 and 20, between two steps' logs
    else:
        wait_until(marker.exists)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert_consistent(run)
    if moment == "mid-checkpoint-write":  # the half-written temp file never replaced the previous checkpoint
        assert safe_load(run / "checkpoints" / "last.pt")["step"] == 10
    if moment == "mid-eval":  # training had finished: its backbone and summary are on disk
        assert "supervised" in json.loads((run / "summary.json").read_text())["_completed_stages"]
    assert finish(recipe, run, "--resume") == expected
    assert not list(run.rglob("*.tmp")), "temp files left behind after the resumed run"
