"""How cost grows (issue 9): engine step time and peak memory against batch size (at 32 px) and image size (at
batch 64) for SimCLR, FixMatch (μ = 2) and MAE, on a small ResNet (WRN-10-1, 78k parameters) and a small ViT
(dim 96, 4 blocks, patch 4). Each point runs in a fresh process (so no earlier point's freed memory is reused):
median of 3 steps after a warm-up step; peak memory is the CUDA allocator's peak on a GPU, and on a CPU the
process's peak RSS during the steps minus its RSS just before the first step (Linux), i.e. the step's working set.
Writes benchmarks/results/scaling.png and prints the table.

    python benchmarks/scaling.py [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import sync, table  # noqa: E402
from ssl_kit.config import validate_recipe  # noqa: E402
from ssl_kit.data.pipeline import prepare_data  # noqa: E402
from ssl_kit.engine.trainer import RunContext, Trainer  # noqa: E402
from ssl_kit.engine.checkpoint import resolve_checkpoint  # noqa: E402
from ssl_kit.methods import build_method  # noqa: E402
from ssl_kit.models.registry import build_backbone  # noqa: E402

BACKBONES = {"WRN-10-1": ("wide_resnet", {"depth": 10, "widen": 1}),
             "ViT d96×4": ("vit_tiny", {"patch_size": 4, "dim": 96, "depth": 4, "heads": 3})}
COMBOS = [("simclr", "WRN-10-1"), ("simclr", "ViT d96×4"), ("fixmatch", "WRN-10-1"), ("fixmatch", "ViT d96×4"),
          ("mae", "ViT d96×4")]
BATCHES = (32, 64, 128, 256)
SIZES = (16, 32, 64)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(device: torch.device) -> float:
    """Start a peak-memory window -> the baseline (MB)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
    return _status_mb("VmRSS:")


def peak_since(device: torch.device, baseline: float) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20 - baseline
    return _status_mb("VmHWM:") - baseline


def stage(method: str, backbone: str, batch: int, size: int, device: str) -> dict:
    name, kwargs = BACKBONES[backbone]
    out = {"name": method, "method": method, "data": {"dataset": "digits", "image_size": size},
           "backbone": {"name": name, "kwargs": kwargs}, "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
           "train": {"steps": 1000, "batch_size": batch, "progress": False, "device": device}}
    if method == "fixmatch":
        out["mu"] = 2
        out["data"]["labels_per_class"] = 30  # 300 labeled images: room for a batch of 256
    if method == "mae":
        out["backbone"]["kwargs"] = {**kwargs, "global_pool": True}
    return out


def measure(method: str, backbone: str, batch: int, size: int, device: str) -> tuple[float, float]:
    cfg = validate_recipe({"seed": 0, "stages": [stage(method, backbone, batch, size, device)]}).stages[0]
    cls = build_method(method)
    data = prepare_data(cfg.data, 0, cls.data_needs(cfg))
    net = build_backbone(BACKBONES[backbone][0], data.info.channels, size, cfg.backbone.kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cls(cfg, net, data.info, **cls.context_from(cfg, data, resolve_checkpoint)), data, cfg,
                          RunContext(Path(tmp), 0), {})
        gc.collect()
        baseline = reset_peak(trainer.device)
        trainer._train_step()
        sync(trainer.device)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            trainer._train_step()
            trainer.step += 1
            sync(trainer.device)
            times.append(time.perf_counter() - start)
        peak = peak_since(trainer.device, baseline)
    return statistics.median(times), peak


def measure_in_child(method: str, backbone: str, batch: int, size: int, device: str) -> tuple[float, float]:
    import json
    import subprocess

    command = [sys.executable, __file__, "--point", method, backbone, str(batch), str(size), "--device", device]
    line = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    values = json.loads(line)
    return values["seconds"], values["peak_mb"]


def plot(points: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for (method, backbone), series in points.items():
        label = f"{method} · {backbone}"
        for row, key in enumerate(("batch", "size")):
            xs = sorted(series[key])
            axes[0][row].plot(xs, [series[key][x][0] * 1000 for x in xs], marker="o", label=label)
            axes[1][row].plot(xs, [series[key][x][1] for x in xs], marker="o", label=label)
    for row, (key, xlabel) in enumerate((("batch", "batch size (32 px)"), ("size", "image size px (batch 64)"))):
        axes[0][row].set_ylabel("step time (ms)")
        axes[1][row].set_ylabel("step working memory (MB)")
        for ax in (axes[0][row], axes[1][row]):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "scaling.png"))
    parser.add_argument("--point", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        import json

        method, backbone, batch, size = args.point
        seconds, peak = measure(method, backbone, int(batch), int(size), args.device)
        print(json.dumps({"seconds": seconds, "peak_mb": peak}))
        return
    points: dict = {}
    rows = []
    for method, backbone in COMBOS:
        series = points.setdefault((method, backbone), {"batch": {}, "size": {}})
        for batch in BATCHES:
            series["batch"][batch] = measure_in_child(method, backbone, batch, 32, args.device)
            rows.append([method, backbone, batch, 32, *series["batch"][batch]])
            print(table(["method", "backbone", "batch", "px", "step s", "peak MB"], rows[-1:]), flush=True)
        for size in SIZES:
            series["size"][size] = series["batch"][64] if size == 32 else measure_in_child(method, backbone, 64,
                                                                                             size, args.device)
            if size != 32:
                rows.append([method, backbone, 64, size, *series["size"][size]])
    print("\n" + table(["method", "backbone", "batch", "px", "step s", "peak MB"], rows))
    plot(points, Path(args.out))
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
