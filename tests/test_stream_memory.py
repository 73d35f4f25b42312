"""Bounded memory: a short streamed SimCLR stage on 20,000 small JPEGs peaks no higher than the same stage on
2,000 plus the file index's size and a small slack; the stream never holds the dataset."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SLACK_MB = 24  # transient lists while indexing, allocator noise
STAGE = """
import json, resource, sys
from ssl_kit.config import validate_recipe
from ssl_kit.data.sources import build_index
from ssl_kit.runner import run_recipe
root, out = sys.argv[1], sys.argv[2]
stage = {"name": "s", "method": "simclr", "temperature": 0.5, "proj_hidden_dim": 32, "proj_dim": 16,
         "data": {"dataset": "images", "root": root, "image_size": 16, "storage": "stream", "workers": 1},
         "backbone": {"name": "small_cnn", "kwargs": {"width": 8}},
         "train": {"steps": 4, "batch_size": 32, "progress": False, "log_every": 2}}
run_recipe(validate_recipe({"seed": 0, "stages": [stage]}), out)
print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "index_bytes": build_index("images", root).nbytes()}))
"""


def tiny_jpegs(root: Path, count: int) -> Path:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (64, 12, 12, 3), dtype=np.uint8)
    for i in range(count):
        folder = root / f"{i // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i % 64]).save(folder / f"{i:06d}.jpg", quality=75)
    return root


def stage_peak(root: Path, out: Path, cache: Path) -> dict:
    env = {"SSL_KIT_CACHE": str(cache), "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
           "MPLBACKEND": "Agg", "WANDB_MODE": "offline", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", STAGE, str(root), str(out)], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    small = stage_peak(tiny_jpegs(tmp_path / "small", 2_000), tmp_path / "run_small", tmp_path / "cache")
    large = stage_peak(tiny_jpegs(tmp_path / "large", 20_000), tmp_path / "run_large", tmp_path / "cache")
    grown_mb = (large["peak_kb"] - small["peak_kb"]) / 1024
    index_mb = large["index_bytes"] / 2 ** 20
    print(f"peak RSS 2k: {small['peak_kb'] / 1024:.1f} MB, 20k: {large['peak_kb'] / 1024:.1f} MB, "
          f"grown {grown_mb:.1f} MB, index {index_mb:.2f} MB")
    # the decoded 20k set at 16 px would be 15 MB, at 224 px 2.9 GB; the index of 20k names is ~0.6 MB
    assert grown_mb <= index_mb + SLACK_MB, (grown_mb, index_mb, small, large)
