"""Helpers shared by the benchmark scripts: interleaved timing (these machines are noisy) and tables."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(functions: dict[str, Callable[[], None]], steps: int, rounds: int, device: torch.device,
                     warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, measured in alternating blocks of `steps` calls so that drift in
    machine load hits every contender alike."""
    for fn in functions.values():
        for _ in range(warmup):
            fn()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(values) for name, values in samples.items()}


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
