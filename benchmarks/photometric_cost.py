"""CPU time of the photometric augmentation per 224 px view: ssl_kit's batched torch ops (4 images at a time, one
thread: what a GPU-less run would do in the training process) and ssl_kit's OpenCV ops (what the streaming workers
run on a CPU: the same ops and random numbers, image by image) against the PIL ops lightly's SimCLRTransform runs in
its workers, on the same crops of real photos. Explains where the CPU time of a streamed SimCLR/DINO batch goes
(README, "Speed").

    python benchmarks/photometric_cost.py --folder /tmp/st/bench   # the stream_throughput.py folder
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import table  # noqa: E402


def cpu_ms(fn, items, repeats: int = 5) -> float:
    """Median CPU milliseconds of fn over `items` per item."""
    samples = []
    for _ in range(repeats):
        start = time.process_time()
        for item in items:
            fn(item)
        samples.append((time.process_time() - start) * 1000 / len(items))
    return sorted(samples)[len(samples) // 2]


def main() -> None:
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF
    from lightly.transforms.gaussian_blur import GaussianBlur
    from PIL import Image

    from ssl_kit.data import augment as A

    from ssl_kit.data import views as V
    from ssl_kit.data import photometric_cv  # noqa: F401  (sets OpenCV to one thread before anything is timed)

    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", required=True)
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    files = sorted((Path(args.folder) / "photos").glob("*.jpg"))[:args.images]
    crops = [T.RandomResizedCrop(224)(Image.open(f).convert("RGB")) for f in files]
    chunks = list(torch.stack([TF.pil_to_tensor(c) for c in crops]).split(4))  # uint8 (4, 3, 224, 224) each
    per_image = lambda fn: (lambda chunk: fn(A.to_unit_float(chunk)))  # noqa: E731

    def opencv(**view_kwargs):
        """One op of ContrastiveView.photometric_uint8's OpenCV backend (the others off) on a chunk of 4."""
        kwargs = dict(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0) | view_kwargs
        view = V.ContrastiveView(V.Normalize([0.5] * 3, [0.5] * 3), **kwargs)
        return lambda chunk: view.photometric_uint8(chunk, backend="opencv")

    ours = {
        "colour jitter (p 0.8, s 1: brightness, contrast, saturation, hue)":
            per_image(lambda y: A.color_jitter(y, 1.0, 0.8)),
        "hue shift alone": per_image(lambda y: A.adjust_hue(y, torch.full((y.shape[0],), 0.1))),
        "grayscale (p 0.2)": per_image(lambda y: A.random_grayscale(y, 0.2)),
        "Gaussian blur (p 0.5, σ 0.1–2, 23 taps)": per_image(lambda y: A.random_blur(y, 0.5)),
        "to float + round to uint8": per_image(lambda y: y.mul(255).round_().to(torch.uint8)),
        "SimCLR's whole photometric part": per_image(lambda y: simclr.photometric(y)),
    }
    simclr = V.ContrastiveView(V.Normalize([0.5] * 3, [0.5] * 3), jitter_strength=1.0, blur_prob=0.5)
    ours_cv = {
        "colour jitter (p 0.8, s 1: brightness, contrast, saturation, hue)": opencv(jitter_prob=0.8,
                                                                                  jitter_strength=1.0),
        "hue shift alone": None,
        "grayscale (p 0.2)": opencv(grayscale_prob=0.2),
        "Gaussian blur (p 0.5, σ 0.1–2, 23 taps)": opencv(blur_prob=0.5),
        "to float + round to uint8": opencv(),
        "SimCLR's whole photometric part": lambda chunk: simclr.photometric_uint8(chunk, backend="opencv"),
    }
    peer = {
        "colour jitter (p 0.8, s 1: brightness, contrast, saturation, hue)":
            T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        "hue shift alone": lambda im: TF.adjust_hue(im, 0.1),
        "grayscale (p 0.2)": T.RandomGrayscale(0.2),
        "Gaussian blur (p 0.5, σ 0.1–2, 23 taps)": GaussianBlur(prob=0.5, sigmas=(0.1, 2.0)),
        "to float + round to uint8": lambda im: T.Normalize([0.5] * 3, [0.5] * 3)(T.ToTensor()(im)),
        "SimCLR's whole photometric part": T.Compose([
            T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(0.2),
            GaussianBlur(prob=0.5, sigmas=(0.1, 2.0)), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]),
    }
    rows = []
    for name in ours:
        mine = cpu_ms(ours[name], chunks) / 4
        mine_cv = cpu_ms(ours_cv[name], chunks) / 4 if ours_cv[name] else float("nan")
        theirs = cpu_ms(peer[name], crops)
        rows.append([name, mine, mine_cv, theirs, mine_cv / theirs])
    rows.append(["JPEG decode, full size (per image; ours decodes at reduced size)", float("nan"), float("nan"),
                 cpu_ms(lambda f: Image.open(f).convert("RGB"), files), float("nan")])
    print(table(["op (per 224 px view)", "ssl_kit torch, 4 at a time (ms)", "ssl_kit OpenCV, workers (ms)",
                 "PIL / torchvision (ms)", "OpenCV / PIL"], rows))
    print("(ours 'to float' rows: uint8 -> float -> uint8, what the workers do around the ops; the peer's: "
          "ToTensor + Normalize, what lightly's workers hand over)")


if __name__ == "__main__":
    main()
