"""Gradient-sync overhead on this CPU: 2 ranks (gloo, one thread each), our ResNet-18 (small stem) + linear head,
32 px, SGD. Per step, measured in interleaved rounds inside the same two processes:

  ddp     torch DistributedDataParallel as the engine wraps it (engine.distributed.wrap_ddp): buckets all-reduced
          while backward still runs
  flat    the engine's former sync, kept here only as the baseline: after the whole backward, every gradient is
          copied into one flat tensor, all-reduced, divided and copied back
  single  one process, the same per-rank batch, no communication (rank 1 waits at a barrier meanwhile)

scaling efficiency = single / ddp: the fraction of the ideal 2× throughput two ranks reach. The machine is shared
with other work: numbers are noisy; the interleaving makes drift hit every contender alike.

    python benchmarks/distributed_overhead.py [--batch 32] [--steps 3] [--rounds 5]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import table  # noqa: E402
from ssl_kit.engine.distributed import wrap_ddp  # noqa: E402
from ssl_kit.models.heads import Classifier  # noqa: E402
from ssl_kit.models.registry import build_backbone  # noqa: E402


def flat_all_reduce(params: list[nn.Parameter]) -> None:
    """The removed ssl_kit.engine.distributed.all_reduce_gradients: one flat all-reduce after backward."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def make_step(model: nn.Module, params, x, y, after_backward=None):
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()

    return step


def _timed(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def worker(rank: int, port: int, args, out: dict) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2"})
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(rank)
    base = Classifier(build_backbone("resnet18", 3, 32, {"small_stem": True}), 10)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    ddp_copy = copy.deepcopy(base)
    ddp_model = wrap_ddp(ddp_copy, torch.device("cpu"), list(ddp_copy.parameters()), find_unused=False)
    flat_model = copy.deepcopy(base)
    contenders = {
        "ddp": make_step(ddp_model, ddp_model.parameters(), x, y),
        "flat": make_step(flat_model, flat_model.parameters(), x, y,
                          lambda: flat_all_reduce(list(flat_model.parameters()))),
        "single": make_step(base, base.parameters(), x, y),
    }
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, step in contenders.items():
            dist.barrier()
            if name == "single" and rank != 0:
                dist.barrier()
                continue
            seconds = _timed(step, args.steps)
            if name == "single":
                dist.barrier()
            if round_:
                samples[name].append(seconds)
    if rank == 0:
        out.update({name: statistics.median(values) for name, values in samples.items()})
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="per-rank batch")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(port, args, out), nprocs=2, join=True)
        result = dict(out)
    ms = {k: 1000 * v for k, v in result.items()}
    print(f"2 ranks × batch {args.batch} (gloo, 1 thread each) vs 1 process × batch {args.batch}; ResNet-18 small "
          f"stem, 32 px; median of {args.rounds} interleaved rounds of {args.steps} steps")
    rows = [[name, f"{ms[name]:.0f}", f"{result[name] / result['single']:.2f}×",
             f"{result['single'] / result[name]:.2f}" if name != "single" else "1.00"]
            for name in ("single", "ddp", "flat")]
    print(table(["step", "ms/step", "vs single", "scaling efficiency"], rows))
    print(f"ddp / flat all-reduce: {result['ddp'] / result['flat']:.2f}×")


if __name__ == "__main__":
    main()
