"""Start-up time (issue 26): wall-clock seconds of fresh processes, side by side in one run, interleaved (each round
runs every command once, in a rotated order, so drift in machine load hits all alike); median and min of --rounds
rounds after one warm-up round.

    ssl-kit --help                                     the CLI answers without importing torch
    python -c "import ssl_kit.losses"                  torch + the losses, nothing else of ssl_kit
    python -c "from lightly.loss import NTXentLoss"    the peer's loss import (lightly, `pip install .[bench]`)

with `python -c pass` (the interpreter's floor) and `python -c "import torch"` for reference. Ratios are to the
lightly import.

    python benchmarks/startup.py --rounds 7
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PYTHON = sys.executable
CLI = Path(PYTHON).parent / "ssl-kit"


def commands() -> dict[str, list[str]]:
    cli = [str(CLI)] if CLI.exists() else [PYTHON, "-m", "ssl_kit.cli"]
    return {
        "python -c pass": [PYTHON, "-c", "pass"],
        "ssl-kit --help": [*cli, "--help"],
        "ssl-kit --version": [*cli, "--version"],
        "ssl-kit recipes": [*cli, "recipes"],
        'python -c "import torch"': [PYTHON, "-c", "import torch"],
        'python -c "import ssl_kit.losses"': [PYTHON, "-c", "import ssl_kit.losses"],
        'python -c "from lightly.loss import NTXentLoss"': [PYTHON, "-c", "from lightly.loss import NTXentLoss"],
    }


def seconds(command: list[str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    runs = commands()
    names = list(runs)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as cwd:  # outside the checkout: no ./recipes, nothing on sys.path by accident
        for name in names:  # warm-up: the page cache holds every library afterwards
            seconds(runs[name], cwd)
        for round_index in range(args.rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(seconds(runs[name], cwd))
    reference = statistics.median(samples[names[-1]])
    print(f"start-up, {args.rounds} interleaved rounds after a warm-up; {os.cpu_count()} CPUs; Python "
          f"{sys.version.split()[0]}")
    print("| command | median s | min s | ÷ lightly import |\n|---|---|---|---|")
    for name in names:
        median = statistics.median(samples[name])
        print(f"| `{name}` | {median:.3f} | {min(samples[name]):.3f} | {median / reference:.3f} |")


if __name__ == "__main__":
    main()
