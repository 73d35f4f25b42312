"""Logging: metrics.jsonl always (rank 0), wandb when enabled (offline unless configured), TensorBoard when enabled
(event files under the run folder), tqdm on stderr. `Loggers` fans one call out to wandb and TensorBoard."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from ..config import TensorBoardConfig, WandbConfig
from ..errors import ConfigError


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 2)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class JsonlLogger:
    """Appends one JSON object per call to metrics.jsonl; flushes every write so a crash loses nothing logged."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        self._handle.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def truncate_metrics(path: Path, completed: list[str], stage: str | None, step: int) -> None:
    """On resume: keep the lines of completed stages and those of `stage` up to checkpoint `step`; the rest will be
    logged again by the resumed run."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if record.get("stage") in completed or (record.get("stage") == stage and record.get("step", -1) <= step):
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


class WandbLogger:
    """Thin wrapper: offline by default; never needs the network unless mode='online' is configured."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict, name: str) -> None:
        self.run = None
        if not cfg.enabled:
            return
        mode = os.environ.get("WANDB_MODE", cfg.mode)
        import wandb  # deferred: heavy optional import (wandb, ~0.3 s), only when logging.wandb is enabled

        self._wandb = wandb
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=mode, dir=str(run_dir), config=config,
                              name=name, reinit="finish_previous")

    def log(self, metrics: dict, step: Optional[int] = None) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def log_artifact(self, path: Path, name: str, kind: str = "model") -> None:
        if self.run is not None:
            artifact = self._wandb.Artifact(name, type=kind)
            artifact.add_file(str(path))
            self.run.log_artifact(artifact)

    def log_image(self, key: str, path: Path) -> None:
        if self.run is not None:
            self.run.log({key: self._wandb.Image(str(path))})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _scalars(metrics: dict) -> dict[str, float]:
    """The numeric entries of a metrics dict (booleans, lists and strings left out)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardLogger:
    """Event files in RUN/tensorboard/ (`tensorboard --logdir runs/`): scalars per step (each stage's own step
    count, the tags are stage-prefixed), image grids, and PNG figures. Needs the `tensorboard` package (the
    `ssl_kit[tensorboard]` extra)."""

    def __init__(self, cfg: TensorBoardConfig, run_dir: Path) -> None:
        self.writer = None
        if not cfg.enabled:
            return
        try:
            # deferred: tensorboard (protobuf, grpc) is an optional extra, imported only when enabled
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ConfigError("tensorboard.enabled: true needs the tensorboard package: "
                              "pip install 'ssl_kit[tensorboard]'") from error
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, metrics: dict, step: Optional[int] = None) -> None:
        if self.writer is not None:
            for key, value in _scalars(metrics).items():
                self.writer.add_scalar(key, value, global_step=step)

    def log_images(self, key: str, images, step: int = 0) -> None:
        """images: float (N, C, H, W), any range: each image is min-max scaled to [0, 1] for display."""
        if self.writer is None:
            return
        flat = images.detach().float().cpu().flatten(1)
        low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
        scaled = ((flat - low) / (high - low).clamp_min(1e-8)).view_as(images)
        self.writer.add_images(key, scaled, global_step=step)

    def log_figure(self, key: str, path: Path) -> None:
        """A PNG written by the report (training curves, confusion matrix, ...) as an image."""
        if self.writer is None:
            return
        import numpy as np  # deferred: with PIL, only when a figure goes to TensorBoard
        from PIL import Image  # deferred: see above

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self.writer.add_image(key, pixels, dataformats="HWC")

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Loggers:
    """The experiment trackers of a run (rank 0): wandb and TensorBoard, each a no-op when disabled."""

    def __init__(self, wandb: WandbLogger, tensorboard: TensorBoardLogger) -> None:
        self.wandb, self.tensorboard = wandb, tensorboard

    def log(self, metrics: dict, step: Optional[int] = None) -> None:
        """Scalars; `step` is the stage's step (TensorBoard's x axis; wandb keeps its own monotonic counter)."""
        self.wandb.log(metrics)
        self.tensorboard.log(metrics, step)

    def log_images(self, key: str, images, step: int = 0) -> None:
        self.tensorboard.log_images(key, images, step)

    def log_figures(self, folder: Path) -> None:
        """Every PNG figure of the run's report (plots/) into both trackers."""
        for path in sorted(folder.glob("*.png")):
            self.wandb.log_image(f"plots/{path.stem}", path)
            self.tensorboard.log_figure(f"plots/{path.stem}", path)

    def log_artifact(self, path: Path, name: str, kind: str = "model") -> None:
        self.wandb.log_artifact(path, name, kind)

    def finish(self) -> None:
        self.wandb.finish()
        self.tensorboard.finish()


def progress(total: int, desc: str, enabled: bool = True, initial: int = 0) -> tqdm:
    """A progress bar on stderr (disabled when not a main process or when asked)."""
    return tqdm(total=total, desc=desc, initial=initial, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                leave=False, mininterval=0.5)
