"""Distributed faults: one rank raising stops every rank promptly with that rank's message (no hang until the
gloo timeout); resuming on another world size refuses clearly (see test_distributed for rank-0-only writes)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_stage
from tests.test_distributed import free_port

WORKER = Path(__file__).with_name("fault_worker.py")


@pytest.mark.slow
def test_one_failing_rank_stops_all_promptly_with_its_message(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"seed": 0, "name": "fault", "stages": [tiny_stage(train={"steps": 400})]}))
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(WORKER), "rank1", str(tmp_path / "marker"), "--", "run", str(recipe), "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300)
    elapsed = time.time() - started
    assert result.returncode != 0
    assert "injected fault on rank 1 at step 3" in result.stderr
    assert "rank      : 1" in result.stderr  # torchrun names the failing rank as the root cause
    assert elapsed < 90, f"ranks took {elapsed:.0f} s to stop (a hang would last until the gloo timeout)"
    assert not (tmp_path / "run" / "summary.json").exists()  # nothing claims the run finished
