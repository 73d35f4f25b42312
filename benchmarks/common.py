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


def sgd_step(model: torch.nn.Module, x, y, layout: torch.memory_format = torch.contiguous_format):
    """A bare SGD forward/backward/step of `model` (in `layout`) on (x, y) — or on each (x_i, y_i) when x and y are
    lists (multi-crop) —, as a function of no arguments."""
    import torch.nn.functional as F

    model = model.to(memory_format=layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pairs = list(zip(x, y)) if isinstance(x, (list, tuple)) else [(x, y)]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        sum(F.cross_entropy(model(xi), yi) for xi, yi in pairs).backward()
        optimizer.step()
    return step


def engine_vs_bare(trainer, bare_model: torch.nn.Module, x, y, steps: int, rounds: int,
                   key_encoder: torch.nn.Module | None = None, key_input: torch.Tensor | None = None,
                   floor_model: torch.nn.Module | None = None) -> dict[str, float]:
    """Seconds per step of the engine (trainer._train_step, the whole method) and of a bare SGD
    forward/backward/step of `bare_model` on (x, y) (`sgd_step`), interleaved. With `key_encoder`, also
    'bare+key': the bare step plus its no-grad forward of `key_input` (default x), the floor of methods that need a
    momentum encoder or an EMA teacher; with `floor_model`, that floor's gradient step is `floor_model`'s (an
    encoder that sees only the patches the method's encoder sees) instead of `bare_model`'s."""
    from ssl_kit.engine.trainer import uses_channels_last

    layout = torch.channels_last if uses_channels_last(trainer.cfg.train.channels_last, trainer.device) \
        else torch.contiguous_format  # the engine's memory layout, same floor
    bare = sgd_step(bare_model, x, y, layout)

    def engine() -> None:
        trainer._train_step()
        trainer.step = (trainer.step + 1) % trainer.total_steps

    contenders = {"bare": bare, "engine": engine}
    if key_encoder is not None:
        key_encoder = key_encoder.to(memory_format=layout)
        key_x = key_input if key_input is not None else (x[0] if isinstance(x, (list, tuple)) else x)
        floor = bare if floor_model is None else sgd_step(floor_model, x, y, layout)

        def bare_and_key() -> None:
            floor()
            with torch.no_grad():
                key_encoder(key_x)

        contenders["bare+key"] = bare_and_key
    return time_interleaved(contenders, steps, rounds, trainer.device)


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def usb_small_cnn_keys(width: int, steps: int, batch: int, device: str) -> dict:
    """The stage keys the semi-supervised tables share (fixmatch_table, imbalanced_table): a small CNN of `width`
    trained with USB's SGD setting (Nesterov momentum 0.9, lr 0.03, weight decay 5e-4, FixMatch's cosine) for
    `steps` steps of `batch` labeled images, the EMA model (0.99) evaluated at the end only. lr_scaling none for every
    row: left out, a supervised row takes its method's recommended linear scaling (0.03 × batch/256) while every
    semi-supervised method trains at 0.03."""
    return {"backbone": {"name": "small_cnn", "kwargs": {"width": width}},
            "optimizer": {"name": "sgd", "lr": 0.03, "lr_scaling": "none", "momentum": 0.9, "nesterov": True,
                          "weight_decay": 5e-4},
            "schedule": {"name": "fixmatch_cosine"},
            "train": {"steps": steps, "batch_size": batch, "ema_decay": 0.99, "eval_every_epochs": 0,
                      "progress": False, "device": device, "checkpoint_every_steps": 100_000}}


def run_stages(stages: list[dict], seed: int = 0, keep_in=None) -> tuple:
    """Run a recipe made of `stages` in a temporary run dir, or in `keep_in` (a new folder that is kept: its
    metrics.jsonl, report and plots). -> (summary, backbone record of the last stage)."""
    import tempfile
    from pathlib import Path

    from ssl_kit.config import validate_recipe
    from ssl_kit.engine.checkpoint import resolve_checkpoint
    from ssl_kit.runner import run_recipe

    recipe = validate_recipe({"seed": seed, "name": "bench", "stages": stages})
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, summary = run_recipe(recipe, Path(keep_in) if keep_in is not None else Path(tmp) / "run")
        record = resolve_checkpoint(run_dir) if (run_dir / "backbone.pt").is_file() else None
    return summary, record


def raw_pixels(spec: str):
    """(train pixels, train labels, test pixels, test labels) at native size, flattened, in [0, 1]."""
    from ssl_kit.data.specs import load_splits

    splits = load_splits(spec)
    train, test = splits["train"], splits["test"]
    x_train = train.images.flatten(1).float().numpy() / 255.0
    x_test = test.images.flatten(1).float().numpy() / 255.0
    return x_train, train.labels.numpy(), x_test, test.labels.numpy()


def raw_pixel_split(spec: str, labels_per_class: int, seed: int):
    """raw_pixels with the labeled index the probes draw: (train pixels, train labels, labeled index, test pixels,
    test labels)."""
    from ssl_kit.data.splits import labeled_indices

    x_train, y_train, x_test, y_test = raw_pixels(spec)
    labeled = labeled_indices(torch.from_numpy(y_train), labels_per_class, seed).numpy()
    return x_train, y_train, labeled, x_test, y_test


def logistic_regression_on_pixels(spec: str, labels_per_class: int, seed: int) -> float:
    from sklearn.linear_model import LogisticRegression

    x_train, y_train, labeled, x_test, y_test = raw_pixel_split(spec, labels_per_class, seed)
    model = LogisticRegression(max_iter=2000).fit(x_train[labeled], y_train[labeled])
    return float((model.predict(x_test) == y_test).mean())


def linear_probe_on_pixels(spec: str, labels_per_class: int | None, seed: int, epochs: int = 100) -> float:
    """ssl_kit's linear probe (the lr/wd sweep on a validation split, then the refit: what every backbone row is
    scored by) on the raw pixels at native size, flattened, in [0, 1]; None: all training labels. The baseline a
    pretrained backbone must beat under the same classifier."""
    from ssl_kit.eval.linear_probe import linear_probe

    x_train, y_train, x_test, y_test = raw_pixels(spec)  # the probe draws the labeled images itself
    result = linear_probe(torch.from_numpy(x_train), torch.from_numpy(y_train), torch.from_numpy(x_test),
                          torch.from_numpy(y_test), int(y_train.max()) + 1, epochs, True, labels_per_class, seed)
    return float(result["top1"])


def label_spreading_on_pixels(spec: str, labels_per_class: int, seed: int, gamma: float = 0.25) -> float:
    """scikit-learn LabelSpreading (rbf) on raw pixels in scikit-learn's 0–16 digits scale. Transductive, as in the
    reference protocol: fitted on training + test images with only the labeled split's labels; accuracy of the
    labels it spreads to the test images."""
    import numpy as np
    from sklearn.semi_supervised import LabelSpreading

    x_train, y_train, labeled, x_test, y_test = raw_pixel_split(spec, labels_per_class, seed)
    x = np.concatenate([x_train, x_test]) * 16.0  # digits' native scale, which gamma = 0.25 was chosen for
    targets = np.full(len(x), -1)
    targets[labeled] = y_train[labeled]
    model = LabelSpreading(kernel="rbf", gamma=gamma, max_iter=100).fit(x, targets)
    return float((model.transduction_[len(x_train):] == y_test).mean())


def mean_std(values: list[float]) -> str:
    import statistics

    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
