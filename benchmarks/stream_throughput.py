"""Streamed images per second delivered to the training device: ssl_kit's streaming loader against torchvision
`ImageFolder` + lightly's documented transforms in a DataLoader with the same number of workers.

- ours: `StreamLoader` workers decode each JPEG once at reduced resolution (PIL draft / DCT scaling), cut every
  view's RandomResizedCrop box from the original geometry, flip, and — what `data.photometric: auto` picks when
  training on a CPU — run the photometric augmentation (colour jitter, grayscale, blur, solarize;
  `ContrastiveView.photometric_uint8`) per micro-batch, handing over uint8 views; the training process normalises.
- device: the same, but the photometric augmentation runs batched in the training process (`data.photometric:
  device`, what a GPU run does; on this CPU it competes with the workers for the cores).
- views: the uint8 views the workers deliver with no photometric step at all (an upper bound).
- peer: `torchvision.datasets.ImageFolder(root, transform=lightly SimCLRTransform() / DINOTransform())`, a
  DataLoader with the same workers, `shuffle=True`; views arrive normalised float.

Two workloads: SimCLR (2 views of 224 px) and DINO multi-crop (2×224 + 6×96). Each contender runs alone in a fresh
process (its workers must not steal cores from another contender), rounds alternate between contenders; the first
batch (worker start-up) is not timed. The data: a folder of real-photo JPEGs of 300-800 px with varied aspect,
made once by random crops and rescales of the sample photos shipped with scikit-learn and scikit-image.

    python benchmarks/stream_throughput.py --folder /tmp/stream_bench [--images 10000] [--batches 8] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONTENDERS = ("ours-simclr", "peer-simclr", "device-simclr", "views-simclr",
              "ours-dino", "peer-dino", "device-dino", "views-dino")


def _sample_photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images
    import skimage.data as sk

    photos = list(load_sample_images().images)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "hubble_deep_field"):
        image = getattr(sk, name)()
        if image.ndim == 3 and image.shape[2] == 3:
            photos.append(image)
    return photos


def _make_chunk(args: tuple[str, int, int]) -> int:
    from PIL import Image

    folder, start, stop = args
    photos = [Image.fromarray(p) for p in _sample_photos()]
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        photo = photos[i % len(photos)]
        w, h = photo.size
        frac = rng.uniform(0.5, 1.0)
        cw, ch = int(w * frac * rng.uniform(0.7, 1.0)), int(h * frac * rng.uniform(0.7, 1.0))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        long_side = int(rng.integers(300, 801))
        aspect = rng.uniform(0.6, 1.7)
        size = (long_side, max(300, int(long_side / aspect))) if aspect >= 1 else (max(300, int(long_side * aspect)), long_side)
        image = photo.crop((left, top, left + cw, top + ch)).resize(size, Image.BILINEAR)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image.save(Path(folder) / f"{i:06d}.jpg", quality=int(rng.integers(80, 96)))
    return stop - start


def make_folder(root: Path, count: int, workers: int = 2) -> Path:
    """root/photos/NNNNNN.jpg, count JPEGs (kept between runs)."""
    folder = root / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.glob("*.jpg")))
    if have < count:
        chunks = [(str(folder), s, min(count, s + 500)) for s in range(have, count, 500)]
        with ProcessPoolExecutor(workers) as pool:
            made = sum(pool.map(_make_chunk, chunks))
        print(f"made {made} JPEGs in {folder}", file=sys.stderr)
    return root


def _views(kind: str):
    """The methods' views with lightly's strengths: SimCLR 2 × (jitter 0.8 s=1, gray 0.2, blur 0.5); DINO globals
    (blur 1.0 / 0.1 + solarize 0.2), 6 locals (blur 0.5), jitter s=0.5."""
    from ssl_kit.data.views import ContrastiveView, Normalize

    normalize = Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    if kind == "simclr":
        settings = [(1.0, 0.5, 0.0)] * 2
    else:
        settings = [(0.5, 1.0, 0.0), (0.5, 0.1, 0.2)] + [(0.5, 0.5, 0.0)] * 6
    return [ContrastiveView(normalize, jitter_strength=s, blur_prob=b, solarize_prob=z) for s, b, z in settings]


def run_ours(root: Path, kind: str, batch: int, batches: int, workers: int, where: str = "workers") -> float:
    """where: workers (photometric in the workers), device (in this process), none (uint8 views only)."""
    import torch

    from ssl_kit.data.crops import CropSpec
    from ssl_kit.data.sources import build_index
    from ssl_kit.data.stream import StreamLoader

    torch.set_num_threads(1)
    index = build_index("images", str(root / "photos"))
    crops = ([CropSpec(224, (0.08, 1.0), count=2, flip=True)] if kind == "simclr" else
             [CropSpec(224, (0.4, 1.0), count=2, flip=True), CropSpec(96, (0.05, 0.4), count=6, flip=True)])
    views = _views(kind)
    photometric = [view.photometric_uint8 for view in views] if where == "workers" else None
    loader = StreamLoader(index, np.arange(len(index)), batch, 0, crops, workers=workers, prefetch=2,
                          photometric=photometric)

    def deliver(b) -> None:
        if where != "none":
            [view(x, precropped=True, augmented=b.views_augmented) for view, x in zip(views, b.views)]

    deliver(loader.batch(0))
    start = time.perf_counter()
    for step in range(1, batches + 1):
        deliver(loader.batch(step))
    return batch * batches / (time.perf_counter() - start)


def run_peer(root: Path, kind: str, batch: int, batches: int, workers: int) -> float:
    import torch
    from lightly.transforms import DINOTransform, SimCLRTransform
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    torch.set_num_threads(1)
    transform = SimCLRTransform(input_size=224) if kind == "simclr" else DINOTransform()
    loader = DataLoader(ImageFolder(str(root), transform=transform), batch_size=batch, shuffle=True,
                        num_workers=workers, drop_last=True, prefetch_factor=2, persistent_workers=True)
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batch * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True, help="where the generated JPEGs live (made once)")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.folder)
    if args.contender:
        side, kind = args.contender.split("-")
        fn = {"ours": run_ours, "peer": run_peer, "device": lambda *a: run_ours(*a, where="device"),
              "views": lambda *a: run_ours(*a, where="none")}[side]
        print(json.dumps({"images_per_s": fn(root, kind, args.batch_size, args.batches, args.workers)}))
        return
    make_folder(root, args.images)
    samples = {name: [] for name in CONTENDERS}
    for _ in range(args.rounds):
        for name in CONTENDERS:
            out = subprocess.run([sys.executable, __file__, "--folder", str(root), "--contender", name,
                                  "--batch-size", str(args.batch_size), "--batches", str(args.batches),
                                  "--workers", str(args.workers)], capture_output=True, text=True, check=True)
            samples[name].append(json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"])
            print(f"{name}: {samples[name][-1]:.1f} images/s", file=sys.stderr)
    median = {name: statistics.median(v) for name, v in samples.items()}
    print("| workload | ssl_kit stream (img/s) | ImageFolder + lightly (img/s) | ratio |")
    print("|---|---:|---:|---:|")
    for kind, label in (("simclr", "SimCLR 2×224"), ("dino", "DINO 2×224 + 6×96")):
        peer = median[f"peer-{kind}"]
        for side, what in (("ours", "photometric in the workers (CPU default)"),
                           ("device", "photometric in the training process (GPU default)"),
                           ("views", "uint8 views only, no photometric")):
            ours = median[f"{side}-{kind}"]
            print(f"| {label}, {what} | {ours:.1f} | {peer:.1f} | {ours / peer:.2f}× |")
    print(f"({args.workers} workers, batch {args.batch_size}, {args.batches} timed batches × {args.rounds} rounds, "
          f"median; {len(list((root / 'photos').glob('*.jpg')))} JPEGs)")


if __name__ == "__main__":
    main()
