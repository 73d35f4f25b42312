"""Run a recipe: each stage in order, writing the run directory that design.md describes.

run_dir/
  config.yaml  metrics.jsonl  summary.json  report.md  plots/
  checkpoints/last.pt          the training checkpoint of the stage in progress
  stages/<stage>/backbone.pt   each training stage's result; backbone.pt = the latest one
  stages/<stage>/eval.json     per-class accuracy and confusion matrix
  splits/<stage>.json          labeled/unlabeled indices
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .config import EVAL_METHODS, Recipe, StageBase, recipe_to_yaml
from .data.pipeline import DataInfo, prepare_data
from .engine import distributed as dist
from .engine.checkpoint import atomic_save, backbone_record, build_from_record, resolve_checkpoint, safe_load
from .engine.loggers import JsonlLogger, WandbLogger, truncate_metrics
from .engine.trainer import RunContext, Trainer
from .errors import ConfigError
from .methods import build_method
from .models.registry import build_backbone


def finite_or_none(value):
    """NaN/inf -> None, recursively, so JSON output stays strict (json.dumps would write NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_run_dir(out: Path, resume: bool) -> None:
    """A new run needs an empty or absent dir; --resume needs an existing one. Nothing is ever overwritten silently."""
    if resume:
        if not (out / "config.yaml").is_file():
            raise ConfigError(f"--resume: {str(out)!r} is not a run directory (no config.yaml)")
        for stale in sorted(out.rglob(".*.tmp")):  # half-written files of a killed writer; complete files are intact
            log(f"[ssl-kit] removing {stale} (left by an interrupted write)")
            stale.unlink()
        return
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"run directory {str(out)!r} exists and is not empty: pass --resume to continue it, "
                          f"or choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def write_env(run_dir: Path) -> None:
    """env.json: ssl_kit version and git commit (when run from a checkout), library versions, device, world size
    and the command line, so a run's numbers can be traced to what produced them."""
    import importlib.metadata
    import platform
    import subprocess

    from . import __version__

    versions = {}
    for package in ("torch", "torchvision", "kornia", "timm", "safetensors", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else (platform.processor() or "cpu")
    env = {"ssl_kit": __version__, "git_commit": commit, "python": platform.python_version(), **versions,
           "device": device, "world_size": dist.world_size(), "command": sys.argv}
    (run_dir / "env.json").write_text(json.dumps(env, indent=2))


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.name or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"


class RecipeRunner:
    """Executes the stages of a recipe into run_dir. summary.json holds flat '<stage>/<metric>' keys."""

    def __init__(self, recipe: Recipe, run_dir: Path, resume: bool = False,
                 step_callback: Optional[Callable[[int], None]] = None) -> None:
        self.recipe, self.run_dir, self.resume = recipe, Path(run_dir), resume
        self.step_callback = step_callback
        self.summary: dict = {}
        self.backbones: dict[str, Path] = {}
        self.is_main = dist.is_main() if dist.is_distributed() else int(os.environ.get("RANK", "0")) == 0

    # ----------------------------------------------------------------------------------- helpers
    @property
    def summary_path(self) -> Path:
        return self.run_dir / "summary.json"

    def _write_summary(self) -> None:
        if self.is_main:
            tmp = self.summary_path.parent / ".summary.json.tmp"
            tmp.write_text(json.dumps(finite_or_none(self.summary), indent=2, sort_keys=False))
            os.replace(tmp, self.summary_path)

    def _done_stages(self) -> list[str]:
        return list(self.summary.get("_completed_stages", []))

    def _truncate_metrics_for_resume(self) -> None:
        checkpoint = self.run_dir / "checkpoints" / "last.pt"
        stage, step = None, -1
        if checkpoint.is_file():
            state = safe_load(checkpoint)
            stage, step = state.get("stage"), int(state.get("step", -1))
        truncate_metrics(self.run_dir / "metrics.jsonl", self._done_stages(), stage, step)

    def _load_record(self, source: str) -> dict:
        """The backbone record of an earlier stage (by name) or of a checkpoint path."""
        return resolve_checkpoint(self.backbones[source] if source in self.backbones else source)

    def _init_record(self, stage: StageBase) -> Optional[dict]:
        if stage.init.checkpoint:
            return resolve_checkpoint(stage.init.checkpoint)
        if stage.init.from_stage:
            return resolve_checkpoint(self.backbones[stage.init.from_stage])
        return None

    def _build_backbone(self, stage: StageBase, info: DataInfo, record: Optional[dict]):
        if record is None:
            return build_backbone(stage.backbone.name, info.channels, info.image_size, stage.backbone.kwargs), \
                {"arch": stage.backbone.name, "kwargs": dict(stage.backbone.kwargs)}
        if "name" in stage.backbone.model_fields_set and stage.backbone.name != record["arch"]:
            raise ConfigError(f"stages[{stage.name}].backbone.name is {stage.backbone.name!r} but the init checkpoint "
                              f"holds a {record['arch']!r}; drop backbone.name or use a matching checkpoint")
        trained = record["data"]
        if trained["channels"] != info.channels:
            raise ConfigError(f"stages[{stage.name}]: the init backbone was trained on {trained['channels']}-channel "
                              f"images, this stage's data has {info.channels}; set data.channels={trained['channels']}")
        kwargs = dict(record["kwargs"])
        if "kwargs" in stage.backbone.model_fields_set:  # e.g. drop_path / global_pool for fine-tuning
            kwargs.update(stage.backbone.kwargs)
        record = dict(record, kwargs=kwargs, data=dict(trained, image_size=info.image_size))
        return build_from_record(record), {"arch": record["arch"], "kwargs": kwargs}

    # ------------------------------------------------------------------------------------ stages
    def run(self) -> dict:
        run_dir = self.run_dir
        if self.is_main:
            (run_dir / "config.yaml").write_text(recipe_to_yaml(self.recipe))
            write_env(run_dir)
        if self.resume and self.summary_path.is_file():
            self.summary = json.loads(self.summary_path.read_text())
        for name, path in self.summary.get("_backbones", {}).items():
            self.backbones[name] = Path(path)
        if self.resume and self.is_main:
            self._truncate_metrics_for_resume()
        metrics = JsonlLogger(run_dir / "metrics.jsonl") if self.is_main else None
        wandb = WandbLogger(self.recipe.wandb, run_dir, self.recipe.model_dump(mode="json"),
                            run_dir.name) if self.is_main else None
        try:
            for stage in self.recipe.stages:
                if stage.name in self._done_stages():
                    log(f"[ssl-kit] stage {stage.name!r} already complete, skipping")
                    continue
                log(f"[ssl-kit] stage {stage.name!r} ({stage.method})")
                seed_everything(self.recipe.seed)
                if stage.method in EVAL_METHODS:
                    results = self._run_eval_stage(stage)
                else:
                    results = self._run_training_stage(stage, RunContext(run_dir, self.recipe.seed, wandb, metrics,
                                                                         self.step_callback))
                self.summary.update({f"{stage.name}/{k}": v for k, v in results.items()})
                self.summary.setdefault("_completed_stages", []).append(stage.name)
                self.summary["_backbones"] = {k: str(v) for k, v in self.backbones.items()}
                self._write_summary()
                if wandb is not None:
                    wandb.log({f"{stage.name}/{k}": v for k, v in results.items() if isinstance(v, (int, float))})
            if self.is_main:
                from .eval.report import write_report

                write_report(run_dir, self.recipe, self.summary)
                if wandb is not None and (run_dir / "backbone.pt").is_file():
                    wandb.log_artifact(run_dir / "backbone.pt", f"{run_dir.name}-backbone")
        finally:
            if metrics is not None:
                metrics.close()
            if wandb is not None:
                wandb.finish()
        return finite_or_none({k: v for k, v in self.summary.items() if not k.startswith("_")})

    def _run_training_stage(self, stage: StageBase, ctx: RunContext) -> dict:
        record = self._init_record(stage)
        data_cfg = stage.data
        if record is not None and data_cfg.channels is None:
            data_cfg = data_cfg.model_copy(update={"channels": record["data"]["channels"]})
        method_cls = build_method(stage.method)
        data = prepare_data(data_cfg, self.recipe.seed, use_unlabeled=method_cls.wants_unlabeled(stage),
                            label_free=method_cls.label_free)
        self._save_split(stage.name, data)
        backbone, arch = self._build_backbone(stage, data.info, record)
        method = method_cls(stage, backbone, data.info, **method_cls.context_from(stage, data, self._load_record))
        meta = {**arch, "data": data.info.to_dict(), "backbone_prefix": method.backbone_prefix,
                "head_prefix": method.head_prefix}
        trainer = Trainer(method, data, stage, ctx, meta)
        if self.resume and trainer.try_resume():
            log(f"[ssl-kit] resumed stage {stage.name!r} at step {trainer.step}/{trainer.total_steps}")
        started = time.perf_counter()
        results = trainer.fit()
        results_flat = {f"test/{k}": v for k, v in results.items() if k in ("top1", "top5", "balanced_accuracy")}
        if "images_per_s" in results:
            results_flat["images_per_s"] = round(results["images_per_s"], 1)
        results_flat["train_seconds"] = round(time.perf_counter() - started, 2)
        results_flat["steps"] = trainer.total_steps
        if self.is_main:
            evaluated = trainer.method.classifier(trainer.ema.module if trainer.ema else None)
            self._save_stage_outputs(stage, trainer, evaluated, results, meta)
            if evaluated is not None:
                results_flat.update(trainer.method.final_report(evaluated, data, self.run_dir))
        return results_flat

    def _save_split(self, name: str, data) -> None:
        if not self.is_main:
            return
        path = self.run_dir / "splits" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "dataset": data.info.dataset, "labeled": data.labeled.tolist(),
            "unlabeled": None if data.unlabeled is None else data.unlabeled.tolist()}))

    def _save_stage_outputs(self, stage: StageBase, trainer: Trainer, evaluated, results: dict, meta: dict) -> None:
        """backbone.pt holds the network whose test metrics are reported: the evaluated classifier (the EMA copy
        when the method evaluates it), else the method's backbone and head."""
        from .models.heads import Classifier

        stage_dir = self.run_dir / "stages" / stage.name
        stage_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(evaluated, Classifier):
            backbone, head = evaluated.backbone, evaluated.head
        else:
            backbone, head = trainer.method.get_backbone(), trainer.method.head()
        record = backbone_record(meta["arch"], meta["kwargs"], meta["data"], backbone, head)
        atomic_save(record, stage_dir / "backbone.pt")
        shutil.copyfile(stage_dir / "backbone.pt", self.run_dir / ".backbone.pt.tmp")
        os.replace(self.run_dir / ".backbone.pt.tmp", self.run_dir / "backbone.pt")
        self.backbones[stage.name] = stage_dir / "backbone.pt"
        details = {k: v for k, v in results.items() if k in ("per_class", "confusion", "top1", "top5")}
        details["classes"] = trainer.data.info.classes
        (stage_dir / "eval.json").write_text(json.dumps(details))

    def _run_eval_stage(self, stage) -> dict:
        from .eval.stages import run_eval_stage

        if stage.checkpoint:
            source = stage.checkpoint
        elif stage.from_stage:
            source = self.backbones[stage.from_stage]
        elif self.backbones:
            source = list(self.backbones.values())[-1]
        else:
            raise ConfigError(f"stages[{stage.name}]: no backbone to evaluate: give checkpoint or from_stage, or put "
                              f"a training stage before it")
        dataset = stage.data
        if dataset is None:
            dataset = resolve_checkpoint(source)["data"]["dataset"]
        return run_eval_stage(stage, source, dataset, self.run_dir, self.recipe.seed, train=run_recipe)


def run_recipe(recipe: Recipe, out: Optional[Path] = None, resume: bool = False,
               step_callback: Optional[Callable[[int], None]] = None) -> tuple[Path, dict]:
    """Run every stage of `recipe` into `out` (a fresh dir under runs/ when None). -> (run_dir, summary)."""
    run_dir = Path(out) if out is not None else default_run_dir(recipe)
    if int(os.environ.get("RANK", "0")) == 0:
        prepare_run_dir(run_dir, resume)
    summary = RecipeRunner(recipe, run_dir, resume, step_callback).run()
    return run_dir, summary
