"""Logging: metrics.jsonl always (rank 0), wandb when enabled (offline unless configured), tqdm on stderr."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from ..config import WandbConfig


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


def progress(total: int, desc: str, enabled: bool = True, initial: int = 0) -> tqdm:
    """A progress bar on stderr (disabled when not a main process or when asked)."""
    return tqdm(total=total, desc=desc, initial=initial, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                leave=False, mininterval=0.5)
