"""ssl_kit against the pipelines users would otherwise build, side by side in one process (one script run):

- SimCLR as lightly documents it: lightly's SimCLRTransform on PIL images in a torch DataLoader with worker
  processes, lightly's SimCLRProjectionHead and NTXentLoss; vs an ssl_kit SimCLR engine step (augmentation on the
  device, batched).
- FixMatch as USB and the reference implementations feed it: torchvision RandAugment + Cutout (RandomErasing) on
  PIL images in DataLoader workers (labeled and unlabeled loaders), joint forward, threshold 0.95, EMA; vs an
  ssl_kit FixMatch engine step.

Same backbone, batch, views, optimizer (SGD momentum) and augmentation strength on both sides; images per second
and the ratio to a bare forward/backward of the backbone on the same number of images. Memory layout: each side as
its library runs it by default — the ssl_kit engine trains convolutions channels-last on the CPU
(`train.channels_last`), the peers and the bare step in PyTorch's default layout. Each contender runs alone in
a fresh process (DataLoader workers must not prefetch while another contender is timed, nor steal its cores);
rounds alternate between contenders so that machine drift hits all alike. Peak memory: that process's peak RSS and
its largest DataLoader worker's.

    pip install lightly --no-deps && pip install lightning-utilities     # optional benchmark extra
    python benchmarks/peer_throughput.py [--model small_cnn|resnet18] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import table  # noqa: E402
from benchmarks.method_overhead import KWARGS  # noqa: E402
from ssl_kit.config import validate_recipe  # noqa: E402
from ssl_kit.data.pipeline import prepare_data  # noqa: E402
from ssl_kit.engine.trainer import RunContext, Trainer  # noqa: E402
from ssl_kit.engine.checkpoint import resolve_checkpoint  # noqa: E402
from ssl_kit.methods import build_method  # noqa: E402
from ssl_kit.models.heads import Classifier  # noqa: E402
from ssl_kit.models.registry import build_backbone  # noqa: E402

SIZE = 32


FORWARD_VIEWS = "joint"  # --forward-views: SimCLR's BatchNorm/forward layout (joint 2N forward or one per view)


def ssl_kit_stage(method: str, model: str, batch: int, mu: int) -> dict:
    stage = {"name": method, "method": method, "data": {"dataset": "digits", "image_size": SIZE},
             "backbone": {"name": model, "kwargs": KWARGS[model]},
             "optimizer": {"name": "sgd", "lr": 0.03, "momentum": 0.9},
             "train": {"steps": 100000, "batch_size": batch, "progress": False, "device": "cpu"}}
    if method == "simclr":
        stage.update(temperature=0.5, proj_hidden_dim=512, proj_dim=128, forward_views=FORWARD_VIEWS,
                     views={"crop_scale": [0.4, 1.0], "jitter_prob": 0.8, "jitter_strength": 0.5,
                            "grayscale_prob": 0.0, "blur_prob": 0.0})
    else:
        stage.update(mu=mu, threshold=0.95)
        stage["data"]["labels_per_class"] = 4
        stage["train"]["ema_decay"] = 0.999
    return stage


def ssl_kit_step(method: str, model: str, batch: int, mu: int, tmp: str):
    cfg = validate_recipe({"seed": 0, "stages": [ssl_kit_stage(method, model, batch, mu)]}).stages[0]
    cls = build_method(method)
    data = prepare_data(cfg.data, 0, cls.data_needs(cfg))
    torch.manual_seed(0)
    backbone = build_backbone(model, data.info.channels, SIZE, KWARGS[model])
    trainer = Trainer(cls(cfg, backbone, data.info, **cls.context_from(cfg, data, resolve_checkpoint)), data, cfg,
                      RunContext(Path(tmp), 0), {})

    def step() -> None:
        trainer._train_step()
        trainer.step = (trainer.step + 1) % trainer.total_steps

    return step, data


def pil_images(data, index=None):
    from PIL import Image

    images = data.train.images if index is None else data.train.images[index]
    return [Image.fromarray(img[0].numpy(), mode="L") for img in images]


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, images, transform, labels=None) -> None:
        self.images, self.transform, self.labels = images, transform, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        out = self.transform(self.images[i])
        return (out, self.labels[i]) if self.labels is not None else out


def endless(loader):
    while True:
        yield from loader


def loader(dataset, batch: int, workers: int):
    return endless(torch.utils.data.DataLoader(dataset, batch, shuffle=True, drop_last=True, num_workers=workers,
                                               persistent_workers=workers > 0, prefetch_factor=2 if workers else None))


def lightly_simclr_step(model: str, batch: int, data, workers: int):
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform

    info = data.info
    transform = SimCLRTransform(input_size=SIZE, cj_prob=0.8, cj_strength=0.5, min_scale=0.4, random_gray_scale=0.0,
                                gaussian_blur=0.0, hf_prob=0.0, normalize={"mean": info.mean, "std": info.std})
    batches = loader(ListDataset(pil_images(data), transform), batch, workers)
    torch.manual_seed(0)
    backbone = build_backbone(model, 1, SIZE, KWARGS[model])
    head = SimCLRProjectionHead(backbone.num_features, 512, 128)
    net = torch.nn.Sequential(backbone, head)
    criterion = NTXentLoss(temperature=0.5)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.03, momentum=0.9)

    def step() -> None:
        x0, x1 = next(batches)
        loss = criterion(net(x0), net(x1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def usb_fixmatch_step(model: str, batch: int, mu: int, data, workers: int):
    import torchvision.transforms as T

    info = data.info
    pad = int(SIZE * 0.125)
    normalize = [T.ToTensor(), T.Normalize(info.mean, info.std)]
    weak = T.Compose([T.RandomCrop(SIZE, padding=pad, padding_mode="reflect"), *normalize])
    strong = T.Compose([T.RandomCrop(SIZE, padding=pad, padding_mode="reflect"), T.RandAugment(num_ops=2,
                        magnitude=10), *normalize, T.RandomErasing(p=1.0, scale=(0.02, 0.25), value=0)])
    labels = data.train.labels[data.labeled].tolist()
    labeled = loader(ListDataset(pil_images(data, data.labeled), weak, labels), batch, max(1, workers // 2))
    unlabeled = loader(ListDataset(pil_images(data, data.unlabeled), lambda im: (weak(im), strong(im))), batch * mu,
                       workers)
    torch.manual_seed(0)
    net = Classifier(build_backbone(model, 1, SIZE, KWARGS[model]), info.num_classes)
    ema = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def step() -> None:
        x, y = next(labeled)
        u_weak, u_strong = next(unlabeled)
        logits = net(torch.cat([x, u_weak, u_strong]))
        logits_x, (logits_w, logits_s) = logits[:len(x)], logits[len(x):].chunk(2)
        probs = torch.softmax(logits_w.detach(), dim=1)
        confidence, pseudo = probs.max(dim=1)
        unsup = (F.cross_entropy(logits_s, pseudo, reduction="none") * (confidence >= 0.95).float()).mean()
        loss = F.cross_entropy(logits_x, y) + unsup
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in net.parameters()], 0.001)

    return step


def bare_step(model: str, images: int, classes: int):
    torch.manual_seed(0)
    net = Classifier(build_backbone(model, 1, SIZE, KWARGS[model]), classes)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.03, momentum=0.9)
    x, y = torch.randn(images, 1, SIZE, SIZE), torch.randint(0, classes, (images,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        optimizer.step()

    return step


CONTENDERS = {"simclr": ("ssl_kit SimCLR", "lightly-style SimCLR", "bare fwd/bwd"),
              "fixmatch": ("ssl_kit FixMatch", "USB-style FixMatch", "bare fwd/bwd")}


def images_per_step(method: str, args) -> int:
    return 2 * args.batch if method == "simclr" else args.fixmatch_batch * (1 + 2 * args.mu)


def build(method: str, which: int, args, tmp: str):
    """The step function of contender `which` (0 ssl_kit, 1 peer, 2 bare) of `method`; only that one is built."""
    if which == 2:
        return bare_step(args.model, images_per_step(method, args), 10)
    batch = args.batch if method == "simclr" else args.fixmatch_batch
    ours, data = ssl_kit_step(method, args.model, batch, args.mu, tmp)
    if which == 0:
        return ours
    del ours
    if method == "simclr":
        return lightly_simclr_step(args.model, args.batch, data, args.workers)
    return usb_fixmatch_step(args.model, args.fixmatch_batch, args.mu, data, args.workers)


def child(args) -> None:
    """Time one contender alone in this fresh process: warm-up, then args.steps steps -> JSON line."""
    import time

    method, which = args.child[0], int(args.child[1])
    with tempfile.TemporaryDirectory() as tmp:
        step = build(method, which, args, tmp)
        for _ in range(3):
            step()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        seconds = (time.perf_counter() - start) / args.steps
    mb = lambda who: resource.getrusage(who).ru_maxrss / 1024  # noqa: E731  (kB on Linux)
    print(json.dumps({"seconds": seconds, "main_mb": mb(resource.RUSAGE_SELF),
                      "worker_mb": mb(resource.RUSAGE_CHILDREN)}))


def measure(method: str, which: int, args) -> dict:
    command = [sys.executable, __file__, "--child", method, str(which), "--model", args.model, "--workers",
               str(args.workers), "--batch", str(args.batch), "--fixmatch-batch", str(args.fixmatch_batch), "--mu",
               str(args.mu), "--steps", str(args.steps), "--forward-views", args.forward_views]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="small_cnn", choices=sorted(KWARGS))
    parser.add_argument("--methods", nargs="+", default=["simclr", "fixmatch"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--fixmatch-batch", type=int, default=32)
    parser.add_argument("--mu", type=int, default=7)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--forward-views", default="joint", choices=["joint", "separate"],
                        help="ssl_kit SimCLR: one 2N forward (joint) or one forward per view (separate, as lightly)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global FORWARD_VIEWS
    FORWARD_VIEWS = args.forward_views
    if args.child:
        return child(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, {args.workers} DataLoader workers, "
          f"backbone {args.model}, {SIZE} px digits; each contender alone in a fresh process, {args.steps} timed "
          f"steps after 3 warm-up steps, rounds alternate between contenders, median of {args.rounds} rounds")
    rows = []
    for method in args.methods:
        results = {which: [] for which in range(3)}
        for _ in range(args.rounds):
            for which in range(3):
                results[which].append(measure(method, which, args))
        seconds = {w: statistics.median(r["seconds"] for r in runs) for w, runs in results.items()}
        images = images_per_step(method, args)
        for which, name in enumerate(CONTENDERS[method]):
            runs = results[which]
            rows.append([name, images, images / seconds[which], seconds[which] / seconds[2],
                         seconds[which] / seconds[0], max(r["main_mb"] for r in runs),
                         max(r["worker_mb"] for r in runs) if which == 1 else "-"])
    print(table(["pipeline", "images/step", "images/s", "step / bare", "time vs ssl_kit", "peak RSS MB",
                 "largest worker MB"], rows))


if __name__ == "__main__":
    main()
