"""SIGTERM (a cluster's pre-emption) and SIGINT (Ctrl-C) stop at a step boundary with a checkpoint; --resume then
finishes with the same summary as an uninterrupted run."""
import json
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import tiny_stage


def write_recipe(path):
    stage = tiny_stage(train={"steps": 200, "checkpoint_every_steps": 1000, "log_every": 1})
    path.write_text(yaml.safe_dump({"seed": 0, "name": "sig", "stages": [stage]}))
    return path


def start(recipe, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "ssl_kit.cli", "run", str(recipe), "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(out, minimum, timeout=120):
    deadline = time.time() + timeout
    metrics = out / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= minimum:
            return
        time.sleep(0.2)
    raise AssertionError("training did not start in time")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_checkpoint_and_resume_matches(tmp_path, sig):
    import torch

    recipe = write_recipe(tmp_path / "r.yaml")
    process = start(recipe, tmp_path / "run")
    wait_for_steps(tmp_path / "run", 5)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + sig, stderr
    assert "--resume" in stderr and "checkpoint saved" in stderr
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert 5 <= state["step"] < 200
    resumed = start(recipe, tmp_path / "run", "--resume", "--json")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    reference = start(recipe, tmp_path / "reference", "--json")
    ref_stdout, ref_stderr = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_stderr
    drop = {"run_dir", "supervised/train_seconds", "supervised/images_per_s"}
    got = {k: v for k, v in json.loads(stdout).items() if k not in drop}
    expected = {k: v for k, v in json.loads(ref_stdout).items() if k not in drop}
    assert got == expected
