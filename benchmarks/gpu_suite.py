"""The GPU suite (issue 29): one command that measures ssl_kit's training step at real sizes against timm's bare step
on the same card, in the same process, and runs the CUDA-marked tests. It builds its own data first (a folder of
JPEGs of 300-800 px cut from scikit-learn's and scikit-image's sample photos), so a fresh machine needs nothing else.

    python benchmarks/gpu_suite.py [--out gpu_suite.json] [--skip-tests]      # on a GPU: ~6-8 min on one H100
    python benchmarks/gpu_suite.py --smoke                                   # every path on the CPU at toy sizes

Sections (each one's failure is recorded in the JSON and the suite goes on: GPU time is scarce):
  floor      timm ResNet-50 and ViT-S/16 training steps (forward, backward, AdamW) at 224 px, bf16 autocast,
             channels-last for the CNN, eager and torch.compile'd: images/s, and compile's speed-up
  methods    ssl_kit's step (trainer._train_step: augmentation, heads, loss, optimizer, momentum updates) for
             SimCLR ResNet-50 (2 x 224), DINO ViT-S/16 (2 x 224 + 8 x 96), MAE ViT-B/16 (mask 0.75), FixMatch
             WRN-28-2 (32 px, mu 7), fed from decoded uint8 in memory and streamed from the JPEG folder by workers
             (SimCLR and DINO streamed twice on CUDA: workers decode, or `data.decode: gpu` decodes with nvJPEG);
             images/s, peak GPU memory, and the ratio to the bare forward/backward/step of the same backbone on the
             same images (DINO's floor includes its teacher's forward; MAE's floor encodes every patch)
  variants   SimCLR ResNet-50 channels-last on/off; DINO ViT-S with train.compile=backbone; ViT-L/16 DINO at batch 64
             with and without backbone.grad_checkpointing (peak memory, or OOM)
  tests      `pytest -m cuda tests/test_cuda.py`: pass/fail counts

Ratios are measured side by side (interleaved rounds, benchmarks/common.time_interleaved) in one process.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import sync, table, time_interleaved  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sizes:
    """What a suite run measures at: the real sizes, or toy ones for --smoke (every path, seconds on a CPU)."""

    images: int  # JPEG files generated for the streamed feed
    memory_images: int  # of those, decoded into memory for the in-memory feed
    sides: tuple[int, int]  # shorter side range of the generated files
    px: int  # global crop size
    local_px: int  # DINO local crops
    batch: int  # images per step of the CNN/ViT-S rows (SimCLR: 2 views of each)
    steps: int  # timed steps per round
    rounds: int
    workers: int
    resnet50: str  # ssl_kit backbone name of the ResNet rows
    timm_resnet: str
    timm_vit: tuple[str, dict]  # timm name + kwargs of the ViT-S floor
    vit_small: dict  # ssl_kit backbone section of the ViT-S rows
    vit_base: dict
    vit_large: dict
    large_batch: int
    wrn: dict
    fixmatch_px: int
    mu: int


FULL = Sizes(images=20000, memory_images=2000, sides=(300, 800), px=224, local_px=96, batch=128, steps=10,
             rounds=3, workers=16, resnet50="resnet50", timm_resnet="resnet50",
             timm_vit=("vit_small_patch16_224", {}),
             vit_small={"name": "vit_small", "kwargs": {"patch_size": 16}},
             vit_base={"name": "vit_base", "kwargs": {"patch_size": 16}},
             vit_large={"name": "vit_base", "kwargs": {"patch_size": 16, "dim": 1024, "depth": 24, "heads": 16}},
             large_batch=64, wrn={"name": "wide_resnet28_2"}, fixmatch_px=32, mu=7)
SMOKE = Sizes(images=60, memory_images=60, sides=(40, 80), px=32, local_px=16, batch=4, steps=1, rounds=1,
              workers=2, resnet50="small_cnn", timm_resnet="test_resnet",
              timm_vit=("test_vit", {"img_size": 32, "patch_size": 8}),
              vit_small={"name": "vit_tiny", "kwargs": {"patch_size": 8, "dim": 32, "depth": 2, "heads": 2}},
              vit_base={"name": "vit_tiny", "kwargs": {"patch_size": 8, "dim": 32, "depth": 2, "heads": 2}},
              vit_large={"name": "vit_tiny", "kwargs": {"patch_size": 8, "dim": 48, "depth": 3, "heads": 2}},
              large_batch=4, wrn={"name": "small_cnn", "kwargs": {"width": 8}}, fixmatch_px=16, mu=2)
CLASSES = 10


# ------------------------------------------------------------------------------------------------------ data
def sample_photos() -> list[np.ndarray]:
    """RGB uint8 photos that ship with scikit-learn and scikit-image (no download)."""
    from sklearn.datasets import load_sample_image

    photos = [load_sample_image(name) for name in ("china.jpg", "flower.jpg")]
    try:
        from skimage import data

        for name in ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left"):
            image = getattr(data, name, lambda: None)()
            if image is not None and image.ndim == 3:
                photos.append(np.ascontiguousarray(image[..., :3]))
    except ImportError:
        pass
    return photos


def _write_files(args: tuple) -> None:
    """Worker: files [start, stop) of the folder, each a random crop of a photo rescaled to a random size."""
    from PIL import Image

    root, start, stop, sides, seed = args
    photos = sample_photos()
    rng = np.random.default_rng(seed + start)
    for i in range(start, stop):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        short = int(rng.integers(sides[0], sides[1] + 1))
        scale = short / min(ch, cw)
        image = Image.fromarray(photo[top:top + ch, left:left + cw]).resize(
            (max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BILINEAR)
        path = Path(root) / f"class{i % CLASSES}" / f"{i:06d}.jpg"
        image.save(path, quality=90)


def make_jpeg_folder(root: Path, count: int, sides: tuple[int, int], workers: int) -> Path:
    """An imagefolder of `count` JPEGs in CLASSES class folders (written in parallel; kept if already complete)."""
    from multiprocessing import get_context

    if root.is_dir() and sum(1 for _ in root.rglob("*.jpg")) == count:
        return root
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    chunk = math.ceil(count / max(1, workers))
    jobs = [(str(root), start, min(count, start + chunk), sides, 0) for start in range(0, count, chunk)]
    if workers <= 1 or len(jobs) == 1:
        for job in jobs:
            _write_files(job)
    else:
        with get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            pool.map(_write_files, jobs)
    return root


def subset_folder(source: Path, target: Path, count: int) -> Path:
    """The first `count` files of `source` as hard links (copies across file systems) in the same class layout: the
    in-memory feed's set. Not symlinks: the folder index does not follow links out of the tree."""
    import shutil

    for path in sorted(source.rglob("*.jpg"))[:count]:
        link = target / path.parent.name / path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            try:
                os.link(path, link)
            except OSError:
                shutil.copyfile(path, link)
    return target


# ----------------------------------------------------------------------------------------------------- floors
def peak_memory_gb(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def bare_step(model: torch.nn.Module, inputs: list[torch.Tensor], device: torch.device,
              teacher: Optional[torch.nn.Module] = None, teacher_inputs: Optional[torch.Tensor] = None
              ) -> Callable[[], None]:
    """A training step of `model` on `inputs` (forward, mean-feature loss, backward, AdamW) under bf16 autocast on
    CUDA; with `teacher`, also its no-grad forward of `teacher_inputs` (DINO's floor)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            loss = sum(model(x).float().square().mean() for x in inputs)
            if teacher is not None:
                with torch.no_grad():
                    teacher(teacher_inputs)
        loss.backward()
        optimizer.step()

    return step


def images(n: int, side: int, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    x = torch.randn(n, 3, side, side, device=device)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def timm_floor(sizes: Sizes, device: torch.device) -> list[dict]:
    """timm's own training step at `px`, eager and compiled, for the ResNet and the ViT: images/s."""
    import timm

    rows = []
    specs = [("resnet", sizes.timm_resnet, {}, True), ("vit", sizes.timm_vit[0], sizes.timm_vit[1], False)]
    for kind, name, kwargs, channels_last in specs:
        batch = 2 * sizes.batch if kind == "resnet" else sizes.batch
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        x = images(batch, sizes.px, device, channels_last)
        eager = bare_step(model, [x], device)
        # smoke: dynamo's tracing only (backend eager), so the path runs in seconds on a CPU
        compiled_model = torch.compile(model) if device.type == "cuda" else torch.compile(model, backend="eager")
        compiled = bare_step(compiled_model, [x], device)
        times = time_interleaved({"eager": eager, "compiled": compiled}, sizes.steps, sizes.rounds, device)
        rows.append({"model": f"timm:{name}", "px": sizes.px, "batch": batch, "channels_last": channels_last,
                     "eager img/s": batch / times["eager"], "compiled img/s": batch / times["compiled"],
                     "compile speed-up": times["eager"] / times["compiled"]})
        del model, compiled_model
    return rows


# ---------------------------------------------------------------------------------------------------- methods
def stage(method: str, backbone: dict, data: dict, batch: int, **keys) -> dict:
    """A training stage as a recipe would give it (the method's defaults, 1000 steps: the schedule is irrelevant)."""
    train = {"steps": 1000, "batch_size": batch, "progress": False, "eval_every_epochs": 0,
             **keys.pop("train", {})}
    return {"name": method, "method": method, "backbone": backbone, "data": data, "train": train, **keys}


def build_trainer(stage_dict: dict, run_dir: Path):
    """(Trainer, cfg) for one stage, built as the runner builds it (grad checkpointing included)."""
    from ssl_kit.config import validate_recipe
    from ssl_kit.data.pipeline import prepare_data
    from ssl_kit.engine.checkpoint import resolve_checkpoint
    from ssl_kit.engine.trainer import RunContext, Trainer
    from ssl_kit.methods import build_method
    from ssl_kit.models.checkpointing import enable_grad_checkpointing
    from ssl_kit.models.registry import build_backbone

    cfg = validate_recipe({"seed": 0, "stages": [stage_dict]}).stages[0]
    cls = build_method(cfg.method)
    data = prepare_data(cfg.data, 0, cls.data_needs(cfg))
    torch.manual_seed(0)
    backbone = build_backbone(cfg.backbone.name, data.info.channels, data.info.image_size, cfg.backbone.kwargs)
    if cfg.backbone.grad_checkpointing:
        enable_grad_checkpointing(backbone, "gpu_suite")
    method = cls(cfg, backbone, data.info, **cls.context_from(cfg, data, resolve_checkpoint))
    return Trainer(method, data, cfg, RunContext(run_dir, 0), {}), cfg


def method_floor(name: str, cfg, sizes: Sizes, device: torch.device) -> tuple[Callable[[], None], int]:
    """The bare step a method's step has to do, and the images it processes per step."""
    from ssl_kit.models.registry import build_backbone

    px, batch = cfg.data.image_size, cfg.train.batch_size
    channels_last = device.type == "cpu" if cfg.train.channels_last is None else cfg.train.channels_last
    backbone = build_backbone(cfg.backbone.name, 3, px, cfg.backbone.kwargs).to(device).train()
    if cfg.backbone.grad_checkpointing:
        from ssl_kit.models.checkpointing import enable_grad_checkpointing

        enable_grad_checkpointing(backbone, "floor")
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    if name.startswith("dino"):
        local = round(px * cfg.local_crop_size)
        inputs = [images(2 * batch, px, device), images(cfg.local_crops * batch, local, device)]
        teacher = build_backbone(cfg.backbone.name, 3, px, cfg.backbone.kwargs).to(device).train()
        return bare_step(backbone, inputs, device, teacher, inputs[0]), (2 + cfg.local_crops) * batch
    if name == "mae":  # the floor MAE is measured against: the encoder on every patch
        return bare_step(backbone, [images(batch, px, device)], device), batch
    if name == "fixmatch":
        count = batch * (1 + 2 * cfg.mu)
        return bare_step(backbone, [images(count, px, device, channels_last)], device), count
    return bare_step(backbone, [images(2 * batch, px, device, channels_last)], device), 2 * batch


def method_rows(sizes: Sizes, folder: Path, memory_folder: Path, device: torch.device) -> list[dict]:
    """Every (method, feed, variant) row: ssl_kit img/s, peak memory, the bare floor's img/s, and their ratio."""
    dev = {"device": device.type}
    stream = {"dataset": f"imagefolder:{folder}", "storage": "stream", "workers": sizes.workers, "prefetch": 4,
              "image_size": sizes.px}
    memory = {"dataset": f"imagefolder:{memory_folder}", "storage": "memory", "workers": 0, "image_size": sizes.px}
    dino_keys = dict(local_crops=8, local_crop_size=sizes.local_px / sizes.px, out_dim=65536 if sizes is FULL else 256,
                     head_hidden_dim=2048 if sizes is FULL else 64, bottleneck_dim=256 if sizes is FULL else 32)
    semi = {"dataset": f"imagefolder:{memory_folder}", "storage": "memory", "workers": 0,
            "image_size": sizes.fixmatch_px, "labels_per_class": 4 if sizes is FULL else 2}
    simclr_r50 = {"name": sizes.resnet50}
    plans = [
        ("simclr", "memory", "", stage("simclr", simclr_r50, memory, sizes.batch, train=dev)),
        ("simclr", "stream", "", stage("simclr", simclr_r50, stream, sizes.batch, train=dev)),
        ("simclr", "memory", "channels_last", stage("simclr", simclr_r50, memory, sizes.batch,
                                                    train={**dev, "channels_last": True})),
        ("dino", "memory", "", stage("dino", sizes.vit_small, memory, sizes.batch, train=dev, **dino_keys)),
        ("dino", "stream", "", stage("dino", sizes.vit_small, stream, sizes.batch, train=dev, **dino_keys)),
        ("dino", "memory", "compile=backbone", stage(
            "dino", sizes.vit_small, memory, sizes.batch, **dino_keys,
            train={**dev, "compile": "backbone", "compile_backend": "inductor" if sizes is FULL else "eager"})),
        ("mae", "memory", "", stage("mae", sizes.vit_base, memory, sizes.batch, train=dev)),
        ("fixmatch", "memory", "", stage("fixmatch", sizes.wrn, semi, 64 if sizes is FULL else 4, mu=sizes.mu,
                                         train=dev)),
        ("dino", "memory", "vit_large", stage("dino", sizes.vit_large, memory, sizes.large_batch, train=dev,
                                              **dino_keys)),
        ("dino", "memory", "vit_large+grad_checkpointing", stage(
            "dino", {**sizes.vit_large, "grad_checkpointing": True}, memory, sizes.large_batch, train=dev,
            **dino_keys)),
    ]
    if device.type == "cuda":  # nvJPEG needs CUDA (the CPU tests run the same code: tests/test_device_decode.py)
        gpu_decode = {**stream, "decode": "gpu"}
        plans[2:2] = [("simclr", "stream", "decode=gpu", stage("simclr", simclr_r50, gpu_decode, sizes.batch,
                                                                train=dev))]
        plans[6:6] = [("dino", "stream", "decode=gpu", stage("dino", sizes.vit_small, gpu_decode, sizes.batch,
                                                              train=dev, **dino_keys))]
    rows = []
    for name, feed, variant, stage_dict in plans:
        row = {"method": name, "feed": feed, "variant": variant, "backbone": stage_dict["backbone"]["name"],
               "px": stage_dict["data"]["image_size"], "batch": stage_dict["train"]["batch_size"]}
        try:
            row.update(measure_method(name, stage_dict, sizes, device))
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
        except Exception as exc:  # recorded; the suite goes on
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            traceback.print_exc()
        finally:
            reset_peak(device)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def measure_method(name: str, stage_dict: dict, sizes: Sizes, device: torch.device) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        trainer, cfg = build_trainer(stage_dict, Path(tmp))
        try:
            trainer.method.train()
            reset_peak(device)

            def engine() -> None:
                trainer._train_step()
                trainer.step += 1

            floor, count = method_floor(name, cfg, sizes, device)
            times = time_interleaved({"engine": engine}, sizes.steps, sizes.rounds, device, warmup=2)
            memory = peak_memory_gb(device)
            times.update(time_interleaved({"floor": floor, "engine": engine}, sizes.steps, sizes.rounds, device,
                                          warmup=1))
        finally:
            close = getattr(trainer.loader, "close", None)
            if close is not None:
                close()
    return {"img/s": count / times["engine"], "floor img/s": count / times["floor"],
            "step / floor": times["engine"] / times["floor"], "peak GB": memory,
            "images per step": count}


def mae_speedup(rows: list[dict]) -> Optional[float]:
    """MAE's step (mask 0.75) against the encoder on all patches: > 1 means faster than the dense encoder."""
    for row in rows:
        if row["method"] == "mae" and "step / floor" in row:
            return 1.0 / row["step / floor"]
    return None


# ------------------------------------------------------------------------------------------------------ tests
def cuda_tests() -> dict:
    """`pytest -m cuda tests/test_cuda.py` in a subprocess: its counts and exit status."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                           str(REPO / "tests" / "test_cuda.py")], cwd=REPO, capture_output=True, text=True)
    last = (done.stdout.strip().splitlines() or [""])[-1]
    return {"returncode": done.returncode, "summary": last, "seconds": time.perf_counter() - started,
            "tail": done.stdout[-2000:] if done.returncode else ""}


# ------------------------------------------------------------------------------------------------------- main
def section(results: dict, name: str, fn: Callable[[], object]) -> None:
    started = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as exc:  # one failed section must not lose the others
        traceback.print_exc()
        results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    results.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 1)


def report(results: dict) -> str:
    lines = [f"device: {results['device']}"]
    if isinstance(results.get("floor"), list):
        lines += ["", table(list(results["floor"][0]), [list(r.values()) for r in results["floor"]])]
    if isinstance(results.get("methods"), list):
        keys = ["method", "feed", "variant", "backbone", "px", "batch", "img/s", "floor img/s", "step / floor",
                "peak GB", "error"]
        lines += ["", table(keys, [[row.get(k, "") if row.get(k) is not None else "" for k in keys]
                                   for row in results["methods"]])]
        lines.append(f"MAE (mask 0.75) vs the encoder on every patch: {results.get('mae_speedup')}")
    if "tests" in results:
        lines.append(f"pytest -m cuda: {results['tests']}")
    lines.append(f"seconds per section: {results.get('seconds')}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every path on the CPU at toy sizes")
    parser.add_argument("--out", default="gpu_suite.json")
    parser.add_argument("--workdir", default=None, help="where the JPEG folder is written (default: a temp dir)")
    parser.add_argument("--skip-tests", action="store_true", help="leave out `pytest -m cuda`")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA device here; run with --smoke to check every path on the CPU")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
    results: dict = {"device": name, "torch": torch.__version__, "smoke": args.smoke}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_suite_"))
    started = time.perf_counter()
    folder = make_jpeg_folder(workdir / "jpegs", sizes.images, sizes.sides, 1 if args.smoke else os.cpu_count() or 1)
    memory_folder = subset_folder(folder, workdir / "jpegs_memory", sizes.memory_images)
    results.setdefault("seconds", {})["data"] = round(time.perf_counter() - started, 1)
    section(results, "floor", lambda: timm_floor(sizes, device))
    section(results, "methods", lambda: method_rows(sizes, folder, memory_folder, device))
    if isinstance(results.get("methods"), list):
        results["mae_speedup"] = mae_speedup(results["methods"])
    if not args.skip_tests:
        section(results, "tests", cuda_tests)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print(report(results), flush=True)
    return results


if __name__ == "__main__":
    main()
