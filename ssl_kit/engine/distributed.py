"""torchrun support: the process group, PyTorch's DistributedDataParallel around a method, object broadcasts from
rank 0 (run dir, evaluation results, backbones, checkpoints). The collectives every layer uses (rank, gathers,
all-reduces) live in `ssl_kit.common.distributed` and are re-exported here.

Everything here is a no-op in a single process without a process group, so every method also runs unchanged on
one CPU process.

DDP choices (the same for every method, except `find_unused_parameters`):
  * gradient_as_bucket_view=True: gradients live in DDP's buckets, no copy into and out of them.
  * buffers are not broadcast at every forward (broadcast_buffers=False; forward_sync_buffers=False in newer torch):
    buffers that must agree across ranks are already synchronised by their method (MoCo's
    queue is filled from every rank's keys, DINO's centre is all-reduced, BatchNorm statistics with backbone.sync_bn),
    and per-rank counters (online probe accuracy, pseudo-label rates) must not be overwritten by rank 0's at every
    forward. Without sync_bn each rank keeps BatchNorm running statistics of its own inputs; rank 0's are saved.
  * find_unused_parameters: declared by each method (`Method.ddp_find_unused_parameters`). static_graph stays off: DINO's graph changes when its last
    layer unfreezes, and a probe without labelled images in a batch is skipped.
  * Momentum encoders, EMA teachers and frozen KD teachers have requires_grad=False, so the reducer ignores them;
    trainable parameters that no optimizer group holds (a disabled online probe) are frozen before wrapping.
"""
from __future__ import annotations

import atexit
import datetime
import inspect
import os
import sys
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from ..common.distributed import (all_reduce_mean, all_reduce_sum, gather_no_grad, gather_objects, gather_with_grad,
                                  is_distributed, is_main, rank, world_size)
from ..limits import knob
from ..methods import build_method

__all__ = ["init_from_env", "leave_process_group", "end_worker", "wrap_ddp", "find_unused_parameters", "step_seed",
           "broadcast_object", "restart_count",
           "launched_distributed", "all_reduce_mean", "all_reduce_sum", "gather_no_grad", "gather_objects",
           "gather_with_grad",
           "is_distributed", "is_main", "rank", "world_size"]




def launched_distributed() -> bool:
    """Whether torchrun started this process as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def restart_count() -> int:
    """How often torchrun has restarted this worker group (--max-restarts); 0 for a first start or no torchrun."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def init_from_env(device: str) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1): nccl on CUDA (each process on the GPU of its
    LOCAL_RANK), gloo on CPU. -> distributed?"""
    if is_distributed():
        return True
    if not launched_distributed():
        return False
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # how long a collective may wait for the slowest rank (ranks waiting while rank 0 evaluates a stage)
    timeout = datetime.timedelta(minutes=knob("SSL_KIT_DIST_TIMEOUT_MIN"))
    store, rank_, world = next(dist.rendezvous("env://", timeout=timeout))
    # torchrun's store outlives a restart: keys under an attempt-specific prefix keep restarted workers from meeting
    # the dead attempt's addresses (seen here: gloo connecting to a killed rank's port, or hanging)
    store = dist.PrefixStore(f"ssl_kit/attempt{restart_count()}", store)
    dist.init_process_group(backend, store=store, rank=rank_, world_size=world, timeout=timeout)
    return True


def leave_process_group() -> None:
    """Destroy the process group a run joined (torchrun), once the run is over: a gloo group left to the interpreter's
    teardown with FSDP2's collectives behind it aborted a worker at exit ("terminate called without an active
    exception", seen once in CI), which torchrun reports as a failed run."""
    if is_distributed():
        dist.destroy_process_group()


def end_worker(status: int) -> NoReturn:
    """End a torchrun worker whose command is over with `status`: Python's exit handlers run (wandb, logging,
    multiprocessing), the standard streams are flushed, and the process ends without the interpreter's and the C++
    libraries' teardown. In that teardown a restarted FSDP worker sometimes aborted after its run had finished and left
    its process group ("terminate called without an active exception", no Python frame left on any thread; about one
    elastic-restart test in twenty on a loaded 2-core machine), and torchrun then reports the finished run as failed,
    or restarts it."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to say
            pass
    os._exit(status)


def find_unused_parameters(stage_cfg) -> bool:
    """The DDP find_unused_parameters of a stage: train.ddp_find_unused_parameters when set, else what the method
    declares (`Method.ddp_find_unused_parameters(cfg)`: DINO freezes its last layer for the first epoch(s); a
    pretext method's online probe is skipped for a batch without labelled images)."""
    chosen = stage_cfg.train.ddp_find_unused_parameters
    if chosen is not None:
        return chosen
    return bool(build_method(stage_cfg.method).ddp_find_unused_parameters(stage_cfg))


def wrap_ddp(module: nn.Module, device: torch.device, trained: list[nn.Parameter],
             find_unused: bool) -> nn.Module:
    """module (already on `device`) -> DistributedDataParallel(module) whose forward is module.forward.
    Trainable parameters not in `trained` (no optimizer group holds them) are frozen first, so the reducer neither
    waits for nor averages them. Parameters and buffers are broadcast from rank 0 once, here."""
    trained_ids = {id(p) for p in trained}
    for param in module.parameters():
        if param.requires_grad and id(param) not in trained_ids:
            param.requires_grad_(False)
    options = {"device_ids": [device.index] if device.type == "cuda" else None, "gradient_as_bucket_view": True,
               "find_unused_parameters": find_unused}
    ddp = nn.parallel.DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:  # newer torch's name for it
        options["forward_sync_buffers"] = False
    else:
        options["broadcast_buffers"] = False
    return ddp(module, **options)


def step_seed(seed: int, step: int, micro: int, rank_: int) -> int:
    """The torch seed of a rank's micro-step under DDP: views, crops and masks differ across ranks (one shared stream
    would give sample i of every rank the same crop) and are a pure function of the step, so a restarted or resumed
    run draws exactly what the uninterrupted one drew."""
    return (seed * 1_000_003 + step * 1_009 + micro * 101 + rank_ * 7_919 + 1) % (2 ** 63)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank (pickled; for results, paths, state dicts); obj itself when not
    distributed."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]
